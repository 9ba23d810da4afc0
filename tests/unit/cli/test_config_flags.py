"""Config-backed verbs take their settings flags from their pydantic models, and nothing else.

For ``loop``, ``eval``, ``serve`` and ``tune``, every option of the verb's parser is either bound to
fields of the config the verb builds (and a value given on the command line lands in every one of
them), or on the verb's explicit allow-list of request-style and operational flags below.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

import pytest
import yaml

from illume.cli import verb_parser
from illume.cli.config_flags import ConfigFlags, Flag, get_path

# Flags that are no config field: what to run on, where output goes, how to print or connect.
ALLOWED = {
    "loop": {"model", "data", "world_seed", "out", "no_progress", "json"},
    "eval": {"model", "adapter", "data", "split", "world_seed", "no_progress", "json", "samples"},
    "serve": {"data_dir", "model", "config", "host", "grpc_port", "http_port", "num_cpus"},
    "tune": {"data_dir", "model", "config", "namespace"},
}


def _base_argv(verb: str, tmp_path: Path) -> list[str]:
    # serve and tune read the embedded default; a model directory of one's own skips its replay pool.
    return ["--data-dir", str(tmp_path), "--model", str(tmp_path)] if verb in ("serve", "tune") else []


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _other(annotation, current):
    """A valid value of ``annotation`` other than ``current`` (its command-line words, the value)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _other(inner, current)
    if origin is typing.Literal:
        choice = next(c for c in reversed(args) if c != current)
        return [str(choice)], choice
    if origin is tuple:
        element = args[0]
        if typing.get_origin(element) is typing.Literal:
            values = tuple(typing.get_args(element)[-1:])
        else:
            values = {float: (0.25, 0.5), str: ("a_proj", "b_proj"), int: (3, 4)}[element]
        values = values if values != current else values[::-1]
        return [",".join(map(str, values))], values
    if annotation is int:
        value = 3 if current is None else current + 1
    elif annotation is float:
        value = 0.5 if not current else current / 2
    elif annotation is str:
        value = "cpu" if current != "cpu" else "auto"
    else:
        raise AssertionError(f"no sample value for {annotation}")
    return [str(value)], value


def _check_verb(verb: str, tmp_path: Path) -> list[str]:
    parser = verb_parser(verb)
    flags: ConfigFlags = parser.get_default("config_flags")
    build = parser.get_default("build_config")
    base = _base_argv(verb, tmp_path)
    defaults = build(parser.parse_args(base))
    problems = []
    for action in _options(parser):
        if action.dest in ALLOWED[verb]:
            continue
        flag: Flag | None = flags.flags.get(action.dest)
        if flag is None:
            problems.append(f"{verb} {'/'.join(action.option_strings)}: neither a config field nor allowed")
            continue
        current = get_path(defaults, flag.path)
        if flags.field(action.dest).annotation is bool:
            words, value = [flag.option.replace("--", "--no-", 1) if current else flag.option], not current
        else:
            values, value = _other(flags.settings.model_fields[action.dest].annotation, current)
            words = [action.option_strings[0], *values]
        config = build(parser.parse_args([*base, *words]))
        for path in flag.paths:
            if get_path(config, path) != value:
                problems.append(
                    f"{verb} {' '.join(words)}: {path} is {get_path(config, path)!r}, not {value!r}"
                )
    missing = ALLOWED[verb] - {a.dest for a in _options(parser)}
    problems += [f"{verb}: allowed flag {dest} is not an option (remove it from ALLOWED)" for dest in missing]
    return problems


@pytest.mark.parametrize("verb", list(ALLOWED))
def test_every_flag_is_a_config_field_or_allowed(verb, tmp_path):
    assert _check_verb(verb, tmp_path) == []


def test_a_stray_flag_is_caught(tmp_path, monkeypatch):
    import illume.cli.loop as loop_verb

    configure = loop_verb.configure

    def with_stray_flag(p: argparse.ArgumentParser) -> None:
        configure(p)
        p.add_argument("--warmup-steps", type=int, default=0)

    monkeypatch.setattr(loop_verb, "configure", with_stray_flag)
    assert _check_verb("loop", tmp_path) == ["loop --warmup-steps: neither a config field nor allowed"]


def test_a_flag_whose_value_does_not_reach_the_config_is_caught(tmp_path, monkeypatch):
    import illume.cli.loop as loop_verb
    from illume.training.loop import LoopConfig

    configure = loop_verb.configure

    def dropping_the_flags(p: argparse.ArgumentParser) -> None:
        configure(p)
        p.set_defaults(build_config=lambda args: LoopConfig())

    monkeypatch.setattr(loop_verb, "configure", dropping_the_flags)
    problems = _check_verb("loop", tmp_path)
    assert "loop --lr 5e-05: train.learning_rate is 0.0001, not 5e-05" in problems
    assert len(problems) == sum(len(flag.paths) for flag in loop_verb.FLAGS)


def test_every_loop_config_field_has_a_flag_or_is_listed_unbound():
    from pydantic import BaseModel

    import illume.cli.loop as loop_verb
    from illume.training.loop import LoopConfig

    def leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
        out = set()
        for name, info in model.model_fields.items():
            nested = info.annotation
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                out |= leaves(nested, f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out

    bound = {path for flag in loop_verb.FLAGS for path in flag.paths}
    assert leaves(LoopConfig) - bound == set(loop_verb.UNBOUND)


def test_eval_settings_are_evaluates_own_settings():
    import inspect

    from illume.cli.evaluate import EvalSettings
    from illume.evaluation.evaluate import evaluate

    own = {"critics", "rouge_threshold"}  # turned into critic objects by the verb
    params = {
        name: p.default
        for name, p in inspect.signature(evaluate).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("adapter_dir", "critics", "progress")
    }
    fields = {name: f.default for name, f in EvalSettings.model_fields.items() if name not in own}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()} == fields


# Commands recorded in docs/TRAINING.md and docs/DEFAULT_MODEL.md (placeholders filled in).
RECORDED = [
    "loop --critic fact --rounds 3 --pool 6000 --feedback-per-round 200 --lr 1e-3 --lr-schedule linear "
    "--lora-r 16 --val-limit 1000 --no-meteor --no-progress --seed 1",
    "loop --model M --data W --rounds 1 --pool 100 --critic rouge_l --rouge-threshold 0.3 --n 10 "
    "--max-new-tokens 20 --val-limit 50 --lr 0.05 --epochs 5 --no-baseline --no-progress",
    "loop --replay-passes 5 --no-replay-pool --lora-projections q_proj,gate_proj --init parent "
    "--train-batch-size 4 --max-steps 7 --eval-n 3 --lora-alpha 8 --batch-size 2 --device cpu "
    "--temperature 0.5 --temperature 0.7",
    "eval --adapter OUT/adapter --critic fact --limit 300 --no-meteor --json",
    "eval --model DIR --critic rouge_l --critic fact --n 10 --temperature 0.3 --temperature 0.9 "
    "--condition-on model --max-new-tokens 100 --world-seed 1 --json --samples",
]


def test_recorded_commands_still_parse_to_the_config_they_meant():
    configs = {}
    for line in RECORDED:
        verb, *argv = line.split()
        parser = verb_parser(verb)
        args = parser.parse_args(argv)
        configs[line] = args.build_config(args)
    first, tiny, more, eval_fact, eval_both = configs.values()
    assert (first.critic, first.rounds, first.pool_size, first.feedback_per_round) == ("fact", 3, 6000, 200)
    assert (first.train.learning_rate, first.train.lr_schedule, first.train.lora_r) == (1e-3, "linear", 16)
    assert (first.train.lora_alpha, first.val_limit, first.meteor) == (32, 1000, False)
    assert first.seed == first.snapshot.seed == first.train.seed == 1
    assert (tiny.critic, tiny.rouge_threshold, tiny.max_new_tokens, tiny.eval_baseline) == (
        "rouge_l",
        0.3,
        20,
        False,
    )
    assert (tiny.train.learning_rate, tiny.train.epochs, tiny.eval_n, tiny.train.lora_alpha) == (
        0.05,
        5,
        10,
        16,
    )
    assert (more.snapshot.replay_passes, more.replay_pool, more.train.init_from) == (5, False, "parent")
    assert more.train.lora_projections == ("q_proj", "gate_proj") and more.temperatures == (0.5, 0.7)
    assert (more.train.batch_size, more.train.max_steps, more.eval_n, more.train.lora_alpha) == (4, 7, 3, 8)
    assert (more.batch_size, more.device, more.train.device) == (2, "cpu", "cpu")
    assert (eval_fact.critics, eval_fact.limit, eval_fact.meteor) == (("fact",), 300, False)
    assert eval_both.critics == ("rouge_l", "fact") and eval_both.condition_on == "model"


def test_a_bad_value_is_a_usage_error_naming_the_flag(capsys):
    parser = verb_parser("loop")
    args = parser.parse_args(["--lr", "0"])
    with pytest.raises(SystemExit) as exit_:
        args.build_config(args)
    assert exit_.value.code == 2
    assert "--lr: Input should be greater than 0" in capsys.readouterr().err


def test_serve_shows_the_embedded_defaults_that_apply():
    from services.config import default_config

    parser = verb_parser("serve")
    flags: ConfigFlags = parser.get_default("config_flags")
    embedded = default_config(Path(".data"), Path("MODEL"), replay_data=Path("replay.json"))
    helps = {a.dest: " ".join((a.help or "").split()) for a in _options(parser)}
    # These differ on purpose from the fields' own defaults (services/config.py default_config).
    assert "(default: 0.001)" in helps["lr"] and "(default: 16)" in helps["lora_r"]
    assert "(default: linear)" in helps["lr_schedule"]
    assert "(default: 10)" in helps["gate_min_items"] and "(default: False)" in helps["gate_allow_empty"]
    for name, flag in flags.flags.items():
        if flag.follows is None:
            assert f"(default: {get_path(embedded, flag.path)})".replace("%%", "%") in helps[name], name


def test_serve_flags_override_a_config_file(tmp_path):
    from services.local import local_config

    file_config = local_config(tmp_path, tmp_path, None).model_dump(mode="json")
    file_config["tuning"]["train"].update(lora_r=4, lora_alpha=12, epochs=3)
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(file_config))
    parser = verb_parser("serve")
    args = parser.parse_args(["--data-dir", str(tmp_path), "--config", str(path), "--epochs", "2"])
    config = args.build_config(args)
    assert (config.tuning.train.lora_r, config.tuning.train.lora_alpha, config.tuning.train.epochs) == (
        4,
        12,
        2,
    )
    args = parser.parse_args(["--data-dir", str(tmp_path), "--config", str(path), "--lora-r", "8"])
    assert args.build_config(args).tuning.train.lora_alpha == 16  # 2 x --lora-r, as in illume loop
