"""Verifiable reasoning tasks with rule-based rewards (see docs/tasks.md)."""

from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import (
    BOXED_INSTRUCTION,
    EOS_TEXT,
    FORMAT_WEIGHT,
    MixedTask,
    Problem,
    Reward,
    Task,
    distinct_problems,
    extract_boxed,
    format_completion,
    load_task,
    split_completion,
)
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.gsm8k import GSM8KTask

__all__ = [
    "BOXED_INSTRUCTION",
    "EOS_TEXT",
    "FORMAT_WEIGHT",
    "ArithmeticTask",
    "CountdownTask",
    "GSM8KTask",
    "MixedTask",
    "Problem",
    "Reward",
    "Task",
    "distinct_problems",
    "extract_boxed",
    "format_completion",
    "load_task",
    "split_completion",
]
