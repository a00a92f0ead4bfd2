"""Greedy generation for evaluation, with one interface over three backends:

    vllm    offline `vllm.LLM` (merged folder, or base + PEFT adapter via enable_lora)
    hf      transformers `generate`, left-padded batches (base + adapter via peft)
    openai  an OpenAI-compatible server (`launch/serve.sh`), POST /v1/completions

Prompts are rendered with `pace_llm.data.render_prompt`, the function training uses.
All backends stop on the same token ids: the tokenizer's eos, the generation config's
eos ids and the chat template's end-of-turn tokens present in the vocabulary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from pace_llm.data import render_prompt
from pace_llm.logs import stderr_to_log

BACKENDS = ("vllm", "hf", "openai")
# End-of-turn tokens of common chat templates (Phi-3, ChatML/SmolLM2/Qwen, Llama-3, Gemma).
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def default_backend() -> str:
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


@dataclasses.dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int] | None]  # generated ids without the final stop token
    num_tokens: list[int]  # generated tokens, a final stop token included
    seconds: float


def add_special_tokens(tokenizer) -> bool:
    """Whether a rendered prompt gets the tokenizer's special tokens (e.g. Llama's bos).
    Not a chat-templated one: the template writes its own, as in
    `apply_chat_template(tokenize=True)` and vLLM's chat endpoint."""
    return not getattr(tokenizer, "chat_template", None)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, exactly as every backend sees them."""
    return tokenizer(list(prompts), add_special_tokens=add_special_tokens(tokenizer))["input_ids"]


def stop_token_ids(tokenizer, model_dir=None) -> list[int]:
    """eos of the tokenizer and of generation_config.json, plus end-of-turn tokens."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen_config = Path(model_dir, "generation_config.json") if model_dir else None
    if gen_config is not None and gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    # an eos id outside the tokenizer (a config default like Phi-3's 32000 on a tiny vocab) is dropped
    return [i for i in dict.fromkeys(int(i) for i in ids) if 0 <= i < len(tokenizer)]


def config_dtype(model_dir) -> str:
    """The checkpoint's dtype name from config.json ('float32', 'bfloat16', ...)."""
    config = json.loads(Path(model_dir, "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).replace("torch.", "")


def _adapter_rank(adapter_dir) -> int:
    return int(json.loads(Path(adapter_dir, "adapter_config.json").read_text())["r"])


def _cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i], i + 1
    return ids, len(ids)


class Generator:
    """Loads a model once for `backend`; `render` then `generate` as many times as needed.

    model_dir: merged HF folder, or the base model when `adapter` is given; for openai the
    local folder (or hub id) of the served model's tokenizer, or None to take it from the
    server's /v1/models (its `root`).
    """

    def __init__(
        self,
        model_dir=None,
        backend: str | None = None,
        adapter=None,
        base_url: str | None = None,
        batch_size: int = 16,
        served_model: str | None = None,
        dtype: str | None = None,
    ):
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "openai" and not base_url:
            raise ValueError("the openai backend needs base_url (e.g. http://127.0.0.1:8000)")
        if backend != "openai" and model_dir is None:
            raise ValueError(f"the {backend} backend needs a model folder")
        self.backend, self.adapter, self.batch_size = backend, adapter, batch_size
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.base_url = base_url.rstrip("/").removesuffix("/v1") if base_url else None
        self.model_name = served_model
        self.concurrency = max(batch_size, 32)  # openai: requests in flight
        self.max_model_len = None
        start = time.perf_counter()
        if backend == "openai":
            self._init_openai()
        import transformers

        # The base model's tokenizer, with an adapter too (vLLM's LoRA uses the base's).
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        local = Path(self.model_dir).is_dir()
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model_dir if local else None)
        self.dtype = dtype or (config_dtype(self.model_dir) if local else None)
        if adapter and not Path(adapter, "adapter_config.json").is_file() and backend != "hf":
            raise ValueError(
                f"{adapter}: no adapter_config.json (a lora_mul_vpt adapter has no "
                f"PEFT form): evaluate its merged folder, or use --backend hf"
            )
        if backend == "vllm":
            self._init_vllm()
        elif backend == "hf":
            self._init_hf()
        self.load_s = time.perf_counter() - start

    # -- prompts ---------------------------------------------------------------------
    def render(self, user_texts: list[str]) -> list[str]:
        return [render_prompt(self.tokenizer, t) for t in user_texts]

    @property
    def add_special_tokens(self) -> bool:
        return add_special_tokens(self.tokenizer)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def close(self) -> None:
        """Free the model (and stop vLLM's engine processes) before the next Generator."""
        llm = self.__dict__.pop("_llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        self.__dict__.pop("_model", None)
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompts: list[str], max_new_tokens: int = 512, progress: bool = True) -> Generation:
        start = time.perf_counter()
        texts, ids, counts = getattr(self, f"_generate_{self.backend}")(prompts, max_new_tokens, progress)
        return Generation(texts, ids, counts, time.perf_counter() - start)

    # -- vLLM ------------------------------------------------------------------------
    def _init_vllm(self):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on GPUs
        from vllm import LLM

        kwargs = dict(model=self.model_dir, tokenizer=self.model_dir, dtype=self.dtype, enforce_eager=True, seed=0)
        self._lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            rank = _adapter_rank(self.adapter)
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in _VLLM_LORA_RANKS if r >= rank))
            self._lora = LoRARequest("adapter", 1, str(Path(self.adapter).resolve()))
        with stderr_to_log():  # the engine's start-up chatter (NUMA binding, weight loading bars)
            self._llm = LLM(**kwargs)

    def _generate_vllm(self, prompts, max_new_tokens, progress):
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            seed=0,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )
        # Token ids, not text: vLLM then sees exactly the tokens the hf backend sees.
        inputs = [{"prompt_token_ids": ids} for ids in self.encode(prompts)]
        outputs = self._llm.generate(inputs, params, use_tqdm=progress, lora_request=self._lora)
        stops = set(self.stop_token_ids)
        texts, ids, counts = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            kept, _ = _cut_at_stop(list(completion.token_ids), stops)
            texts.append(completion.text)
            ids.append(kept)
            counts.append(len(completion.token_ids))
        return texts, ids, counts

    # -- transformers ----------------------------------------------------------------
    def _init_hf(self):
        import torch
        import transformers

        dtype = getattr(torch, self.dtype) if self.dtype not in (None, "auto") else "auto"
        model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        if self.adapter:
            if Path(self.adapter, "adapter_config.json").is_file():
                import peft

                model = peft.PeftModel.from_pretrained(model, str(self.adapter))
            else:  # lora_mul_vpt: pace-llm's own format
                from pace_llm.export import load_adapter

                model = load_adapter(model, self.adapter)
        self._model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_model_len = getattr(model.config, "max_position_embeddings", None)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    def _generate_hf(self, prompts, max_new_tokens, progress):
        import torch
        import transformers
        from tqdm.auto import tqdm

        tok, stops = self.tokenizer, set(self.stop_token_ids)
        lengths = [len(ids) for ids in self.encode(prompts)]
        # Stop where vLLM stops: prompt + completion within the context length.
        caps = _length_caps(lengths, max_new_tokens, self.max_model_len)
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: less padding
        results = [None] * len(prompts)
        device = next(self._model.parameters()).device
        bar = tqdm(total=len(prompts), desc="generate (hf)", unit="prompt", disable=not progress)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = tok(
                [prompts[i] for i in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens(tok),
            ).to(device)
            # A fresh config: the checkpoint's generation_config (sampling, penalties) must
            # not change greedy decoding.
            config = transformers.GenerationConfig(
                do_sample=False,
                max_new_tokens=max(1, max(caps[i] for i in chunk)),
                eos_token_id=self.stop_token_ids,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
            )
            with torch.inference_mode():
                out = self._model.generate(**enc, generation_config=config)
            for row, i in enumerate(chunk):
                new = out[row, enc["input_ids"].shape[1] :].tolist()[: caps[i]]
                kept, count = _cut_at_stop(new, stops)
                results[i] = (tok.decode(kept, skip_special_tokens=True), kept, count)
            bar.update(len(chunk))
        bar.close()
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    # -- OpenAI-compatible server ----------------------------------------------------
    def _request(self, path: str, payload: dict | None = None, timeout: float = 3600):
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"{self.base_url}{path}: HTTP {err.code}: {err.read().decode()[:500]}") from None

    def _init_openai(self):
        models = self._request("/v1/models", timeout=60)["data"]
        if not models:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model")
        ids = [m["id"] for m in models]
        if self.model_name is None:
            self.model_name = self.model_dir if self.model_dir in ids else ids[0]
        elif self.model_name not in ids:
            raise ValueError(f"served model {self.model_name!r} not in {ids}")
        served = next(m for m in models if m["id"] == self.model_name)
        self.max_model_len = served.get("max_model_len")  # vLLM's field; None elsewhere
        if self.model_dir is None:  # the tokenizer: the served model's folder
            self.model_dir = served.get("root") or served["id"]

    def _generate_openai(self, prompts, max_new_tokens, progress):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        stops = set(self.stop_token_ids)
        # The server rejects prompt + max_tokens > max_model_len (vLLM offline and the hf
        # backend stop there instead): one request per prompt, each with its own cap.
        caps = _length_caps([len(ids) for ids in self.encode(prompts)], max_new_tokens, self.max_model_len)

        def complete(i):
            # temperature 0 is greedy; penalties pinned so a generation_config cannot change it.
            # stop_token_ids, skip_special_tokens, add_special_tokens, return_token_ids: vLLM's.
            payload = {
                "model": self.model_name,
                "prompt": prompts[i],
                "max_tokens": caps[i],
                "temperature": 0,
                "repetition_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "stop_token_ids": self.stop_token_ids,
                "skip_special_tokens": True,
                "add_special_tokens": self.add_special_tokens,
                "return_token_ids": True,
            }
            response = self._request("/v1/completions", payload)
            choice = response["choices"][0]
            token_ids = choice.get("token_ids")
            if token_ids is None:  # not a vLLM server
                count = (response.get("usage") or {}).get("completion_tokens")
                return choice["text"], None, count if count is not None else 0
            return choice["text"], _cut_at_stop(list(token_ids), stops)[0], len(token_ids)

        results = []
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            for result in tqdm(
                pool.map(complete, range(len(prompts))),
                total=len(prompts),
                desc="generate (openai)",
                unit="prompt",
                disable=not progress,
            ):
                results.append(result)
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]


def _length_caps(prompt_lengths: list[int], max_new_tokens: int, max_model_len: int | None) -> list[int]:
    """Per-prompt max_new_tokens so that prompt + completion fits the context, as vLLM does."""
    if not max_model_len:
        return [max_new_tokens] * len(prompt_lengths)
    return [max(0, min(max_new_tokens, max_model_len - n)) for n in prompt_lengths]
