"""GSM-8K evaluation end to end on a tiny Phi-3 (merged folder + PEFT adapter, local tokenizer).

The hf, vllm and openai (served) backends must give identical greedy completions, and vLLM
with the unmerged adapter (enable_lora) must match vLLM on the merged folder. vLLM runs in
subprocesses (the CLI, the server) with their own TMPDIR, one at a time.
"""

import importlib.util
import json
import os
import signal
import string
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.benchmarks.gsm8k import INSTRUCTION, evaluate_gsm8k, load_problems, prompt_text
from pace_llm.data import render_prompt
from pace_llm.distributed.launcher import free_port as _free_port
from pace_llm.generation import Generator, encode_prompts, stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 512  # the CLI default: long enough to reach the 256-token context limit
VLLM_TIMEOUT = 420

SPECIALS = ["<pad>", "<s>", "<|endoftext|>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {"question": "What is 3 plus 4?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Tom has 5 apples and eats 2. How many are left?", "answer": "5 - 2 = 3\n#### 3"},
    {"question": "A shirt costs $1,200 and is 25% off. What is the price?", "answer": "#### 900"},
    {"question": "How many legs do 3 cats have?", "answer": "3 x 4 = 12\n#### 12"},
]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 256-token BPE with Phi-3's specials and chat format, adding <s> like Llama/Phi-3."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=SPECIALS, show_progress=False, initial_alphabet=list(string.printable)
    )
    tok.train_from_iterator([INSTRUCTION] + [r["question"] + "\n" + r["answer"] for r in ROWS] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def one_thread():
    """On 2 shared cores, 2 OpenMP threads can make tiny-model generate ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """base/ (the tiny Phi-3), adapter/ (PEFT) and merged/ (base + adapter), one tokenizer."""
    root = tmp_path_factory.mktemp("gsm8k")
    tok = build_tokenizer()
    # initializer_range 0.1 (not 0.02): larger logit gaps, so greedy paths have no near-ties
    model = tiny_model(
        "phi3", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1
    )
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = pace_llm.apply_pace(model, pace_llm.PaceConfig(rank=8, sigma=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "trained" adapters: random values instead of B = 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pace_llm.save_adapter(model, root / "adapter")  # before save_merged, which merges in place
    pace_llm.save_merged(model, root / "merged", tokenizer=tok)
    data = root / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return types.SimpleNamespace(
        root=root, base=root / "base", adapter=root / "adapter", merged=root / "merged", data=data, tokenizer=tok
    )


@pytest.fixture(scope="module")
def hf_result(exported):
    return evaluate_gsm8k(
        exported.merged,
        load_problems(str(exported.data)),
        backend="hf",
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=4,
        verbose=False,
    )


def completions(result_or_samples):
    samples = result_or_samples["samples"] if isinstance(result_or_samples, dict) else result_or_samples
    return [s["completion"] for s in samples]


def token_counts(result_or_samples):
    samples = result_or_samples["samples"] if isinstance(result_or_samples, dict) else result_or_samples
    return [s["completion_tokens"] for s in samples]


# -- hf backend (in-process, fast) ---------------------------------------------------------


def test_stop_tokens_and_prompt_tokens(exported):
    tok = exported.tokenizer
    # eos plus the chat template's end-of-turn token; <|user|>/<|assistant|> are not stops
    assert stop_token_ids(tok, exported.merged) == [
        tok.convert_tokens_to_ids("<|endoftext|>"),
        tok.convert_tokens_to_ids("<|end|>"),
    ]
    # the chat template writes its own specials: no <s> added; a plain prompt gets <s>
    chat = render_prompt(tok, "hi")
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert encode_prompts(tok, [chat])[0] == tok(chat, add_special_tokens=False)["input_ids"]
    plain = build_tokenizer()
    plain.chat_template = None
    assert render_prompt(plain, "hi") == "hi"
    assert encode_prompts(plain, ["hi"])[0][0] == plain.bos_token_id == 1


def test_hf_backend_end_to_end(exported, hf_result):
    r = hf_result
    assert r["n"] == len(ROWS)
    assert r["accuracy"] == sum(s["correct"] for s in r["samples"]) / len(ROWS)
    assert r["accuracy_strict"] == sum(s["correct_strict"] for s in r["samples"]) / len(ROWS)
    assert r["settings"]["dtype"] == "float32" and r["settings"]["stop_token_ids"] == [2, 6]
    assert r["timing"]["generated_tokens"] == sum(token_counts(r)) > 0
    for sample, row in zip(r["samples"], ROWS):
        assert sample["prompt"] == render_prompt(exported.tokenizer, prompt_text(row["question"]))
        assert sample["prompt"].startswith("<|user|>\n" + INSTRUCTION) and sample["prompt"].endswith("<|assistant|>\n")
        assert sample["reference"] == row["answer"].rsplit("#### ", 1)[1].replace(",", "")
        assert "<|end|>" not in sample["completion"] and "<|endoftext|>" not in sample["completion"]
    texts = completions(r)
    assert len(set(texts)) >= len(texts) - 1 and all(texts)  # not trivial
    # long completions stop at the 256-token context, as vLLM does
    prompt_lengths = [len(exported.tokenizer(s["prompt"], add_special_tokens=False)["input_ids"]) for s in r["samples"]]
    assert all(p + n <= 256 for p, n in zip(prompt_lengths, token_counts(r)))


def test_hf_greedy_paths_have_no_near_ties(exported, hf_result):
    """Precondition of the cross-backend comparisons: fp32 kernel differences (~1e-6) cannot
    flip a greedy choice when the top-2 logit gap is far larger."""
    gen = Generator(exported.merged, backend="hf", batch_size=len(ROWS))
    prompts = gen.render([prompt_text(r["question"]) for r in ROWS])
    out = gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert out.texts == completions(hf_result)  # batch of 6 (more padding) = batches of 4
    gaps = []
    for prompt, generated in zip(encode_prompts(gen.tokenizer, prompts), out.token_ids):
        with torch.no_grad():  # the choice of every generated token and of the one after
            logits = gen._model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
    gen.close()
    assert min(gaps) > 1e-4, gaps


def test_hf_adapter_and_batching_match_merged(exported, hf_result):
    rows = load_problems(str(exported.data))
    # PEFT adapter on the base, one prompt per batch (no padding): same completions
    peft_result = evaluate_gsm8k(
        exported.base,
        rows,
        backend="hf",
        adapter=exported.adapter,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=1,
        verbose=False,
    )
    assert completions(peft_result) == completions(hf_result)
    assert token_counts(peft_result) == token_counts(hf_result)
    # and the adapter matters: the base model alone answers differently
    base_result = evaluate_gsm8k(
        exported.base, rows, backend="hf", max_new_tokens=MAX_NEW_TOKENS, batch_size=6, verbose=False
    )
    assert completions(base_result) != completions(hf_result)


# -- vLLM (subprocesses) -------------------------------------------------------------------


def _env(tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        TMPDIR=str(tmp),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine in the CLI's process: faster start
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )


def run_cli(exported, name: str, *args) -> tuple[dict, list[dict]]:
    out = exported.root / f"{name}.json"
    log = exported.root / f"{name}.log"
    cmd = [
        sys.executable,
        str(ROOT / "eval" / "gsm8k.py"),
        "--data",
        str(exported.data),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--output",
        str(out),
        "--quiet",
        *args,
    ]
    with log.open("w") as f:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_env(exported.root / f"tmp-{name}"),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=VLLM_TIMEOUT,
        )
    assert proc.returncode == 0, log.read_text()[-4000:]
    samples = [json.loads(line) for line in out.with_name(f"{name}.samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), samples


@pytest.fixture(scope="module")
def vllm_merged(exported):
    return run_cli(exported, "vllm-merged", "--model", str(exported.merged), "--backend", "vllm")


@pytest.mark.slow
def test_vllm_matches_hf(exported, hf_result, vllm_merged):
    result, samples = vllm_merged
    assert completions(samples) == completions(hf_result)
    assert token_counts(samples) == token_counts(hf_result)
    assert {k: result[k] for k in ("accuracy", "accuracy_strict", "n")} == {
        k: hf_result[k] for k in ("accuracy", "accuracy_strict", "n")
    }
    assert result["settings"]["backend"] == "vllm" and result["settings"]["dtype"] == "float32"
    assert result["settings"]["data"] == str(exported.data)
    assert result["timing"]["prompts_per_s"] > 0 and result["timing"]["tokens_per_s"] > 0
    assert [s["question"] for s in samples] == [r["question"] for r in ROWS]
    assert all({"completion", "extracted", "reference", "correct"} <= s.keys() for s in samples)


@pytest.mark.slow
def test_vllm_lora_adapter_matches_merged(exported, vllm_merged):
    result, samples = run_cli(
        exported, "vllm-lora", "--model", str(exported.base), "--adapter", str(exported.adapter), "--backend", "vllm"
    )
    assert result["settings"]["adapter"] == str(exported.adapter)
    assert completions(samples) == completions(vllm_merged[1])
    assert token_counts(samples) == token_counts(vllm_merged[1])


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_served_model_matches_vllm(exported, vllm_merged):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = exported.root / "serve.log"
    env = _env(exported.root / "tmp-serve")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    with log.open("w") as f:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "launch" / "serve.sh"), str(exported.merged), str(port)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log, timeout=VLLM_TIMEOUT)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == str(exported.merged)
        # the CLI in-process (the openai backend does not import vLLM); tokenizer from the server
        spec = importlib.util.spec_from_file_location("eval_gsm8k", ROOT / "eval" / "gsm8k.py")
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        out = exported.root / "served.json"
        result = cli.main(
            [
                "--backend",
                "openai",
                "--base-url",
                url + "/v1",
                "--data",
                str(exported.data),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        samples = [json.loads(line) for line in out.with_name("served.samples.jsonl").read_text().splitlines()]
        assert result["settings"]["backend"] == "openai" and result["n"] == len(ROWS)
        assert completions(samples) == completions(vllm_merged[1])
        assert token_counts(samples) == token_counts(vllm_merged[1])
        assert result["accuracy"] == vllm_merged[0]["accuracy"]
    finally:
        proc.terminate()  # serve.sh execs the server: this is its PID
        try:
            proc.wait(timeout=60)
        finally:
            try:  # its engine processes, in the session this test started
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
