"""PaceArguments: the recipe's `pace` section (PaceConfig) as command-line arguments.

    parser = HfArgumentParser((SFTConfig, PaceArguments))
    training_args, pace = parser.parse_args_into_dataclasses()
    #   --mode fast --lam 0.05 --sigma 1.0 --target_modules q_proj v_proj

Every field, default and check is PaceConfig's. One field is redeclared: HfArgumentParser
cannot read `target_modules: Optional[Union[str, list[str]]]` (one type per argument), so
here it is a list of module-name suffixes, and a single "all-linear" becomes that string.
A regex (a str) can still be passed from Python.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pace_llm.core.pace_config import PaceConfig


@dataclasses.dataclass
class PaceArguments(PaceConfig):
    target_modules: Optional[list[str]] = dataclasses.field(
        default=None,
        metadata={
            "help": "module-name suffixes to adapt (q_proj v_proj), or all-linear; none: the architecture's default"
        },
    )

    def __post_init__(self):
        if isinstance(self.target_modules, list) and self.target_modules == ["all-linear"]:
            self.target_modules = "all-linear"
        super().__post_init__()
