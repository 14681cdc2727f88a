"""pipelines/common/flags.py: every stage's --help reads on its own (no Ray started)."""

import importlib
import re

import pytest

from pipelines.common.flags import build_parser, examples, option, parse

STAGES = {"prepare": ("pipelines.preparing.config", "PrepareConfig"),
          "train": ("pipelines.training.config", "TrainConfig"),
          "tune": ("pipelines.tune", "SweepConfig"),
          "evaluate": ("pipelines.evaluate", "EvaluateConfig"),
          "generate": ("pipelines.generate", "GenerateConfig"),
          "visualize": ("pipelines.visualize", "VisualizeConfig")}


def stage_help(stage: str) -> str:
    module, name = STAGES[stage]
    cls = getattr(importlib.import_module(module), name)
    doc = importlib.import_module(f"pipelines.{stage}").__doc__
    return build_parser(cls, f"gpt2 {stage}", doc).format_help()


def flag_blocks(text: str) -> dict[str, str]:
    """--flag -> its help text (over its wrapped lines), from a --help."""
    options = text.split("options:\n", 1)[1].split("\n\nexamples:")[0]
    blocks = re.split(r"\n(?=  -)", options)
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks}


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_shows_its_default_once_and_help_ends_with_examples(stage):
    text = stage_help(stage)
    blocks = flag_blocks(text)
    assert "--verbose" in blocks["-v"]
    for flag, block in blocks.items():
        assert len(re.findall(r"\bdefault\b", block, re.I)) <= 1, (flag, block)
        assert "(default: None)" not in block and "(default: [])" not in block, (flag, block)
    tail = text.rstrip().split("examples:\n")[1].splitlines()
    assert 2 <= len(tail) <= 3 and all(f"gpt2 {stage}" in line or f"pipelines/{stage}.py"
                                       in line for line in tail), tail


def test_required_flags_are_marked_and_refused_when_absent(capsys):
    from pipelines.evaluate import EvaluateConfig
    from pipelines.generate import GenerateConfig

    blocks = flag_blocks(build_parser(GenerateConfig, "gpt2 generate", "x").format_help())
    assert blocks["--model_path"].endswith("(required)")
    with pytest.raises(SystemExit):
        parse(GenerateConfig, ["--prompt", "hi"], prog="gpt2 generate")
    assert "--model_path" in capsys.readouterr().err
    blocks = flag_blocks(build_parser(EvaluateConfig, "gpt2 evaluate", "x").format_help())
    assert "required, except with --smoke-test" in blocks["--eval_corpus"]


def test_a_bool_or_none_flag_is_on_off_or_left_to_decide():
    """`gpt2 train --compile / --no-compile`; neither: None, decided by the device."""
    from pipelines.training.config import TrainConfig

    assert [parse(TrainConfig, a, prog="gpt2 train").compile
            for a in ([], ["--compile"], ["--no-compile"])] == [None, True, False]
    blocks = flag_blocks(build_parser(TrainConfig, "gpt2 train", "x").format_help())
    assert blocks["--compile"].startswith("--compile, --no-compile torch.compile the model")
    assert "default: on with --gpus, off on CPUs" in blocks["--compile"]


def test_verbose_is_recorded_for_ray_session(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Config:
        steps: int = option(3, "optimizer steps")

    monkeypatch.setenv("GPT2_VERBOSE", "")  # restored after: -v below sets it to "1"
    assert parse(Config, ["--steps", "4"], prog="x").steps == 4
    from pipelines.common.flags import verbose
    assert not verbose()
    parse(Config, ["-v"], prog="x")
    assert verbose()


def test_examples_take_the_docstrings_first_block_without_continued_commands():
    doc = ("Title.\n\n    a --x 1    # one\n    b --y \\\n" + " " * 90
           + "--z\n    c\n    d\n\nMore.\n")
    doc = doc.replace("\\\n", "")  # what a docstring's backslash-newline becomes
    assert examples(doc) == "examples:\n    a --x 1    # one\n    c\n    d"
