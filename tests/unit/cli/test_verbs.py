"""The ``illume`` verbs: every one is listed with its help, loads only when chosen, and keeps its flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from illume.cli import build_parser, main, verb_targets

VERBS = ["generate", "client", "eval", "loop", "simulate", "study", "serve", "tune"]


def test_every_verb_is_listed_with_the_help_of_its_configure_function():
    # serve and tune come from services' entry points (pyproject.toml; `make install` registers them).
    assert list(verb_targets()) == VERBS
    verbs = next(a for a in build_parser()._actions if a.dest == "verb")
    helps = {choice.dest: choice.help for choice in verbs._choices_actions}
    assert helps["serve"] == "run the server on this machine (local Ray cluster)"
    assert all(helps[verb] and not helps[verb].startswith("(from") for verb in VERBS), helps


def test_the_verb_listing_imports_no_verb_module_nor_model_code():
    code = (
        "import sys\n"
        "from illume.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'services', 'transformers')\n"
        "         or (m.startswith('illume.cli.') and m != 'illume.cli.__main__')]\n"
        "print('HEAVY', sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "serve" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            "client feedback --generation G --fit G-c0 --fit G-c1 --answer-correct yes --target h:1",
            {"generation": "G", "fit": ["G-c0", "G-c1"], "answer_correct": True, "role": "annotator"},
        ),
        (
            "client promote 3 --alias canary --canary-share 0.2",
            {"adapter": "3", "alias": "canary", "role": "admin"},
        ),
        ("client start-round --force --namespace ns --tls", {"force": True, "namespace": "ns", "tls": True}),
        ("client round R1", {"round_id": "R1", "client_verb": "round"}),
        (
            "simulate --rounds 3 --pool 60 --val 100 --critic fact --api-key-file k --data-dir D",
            {"rounds": 3, "pool": 60, "val": 100, "critic": "fact", "api_key_file": "k", "role": "admin"},
        ),
        (
            "generate --model M --image i.png --question q --temperature 0.3 --temperature 0.9 --n 4",
            {"model": "M", "temperature": [0.3, 0.9], "n": 4, "json": False},
        ),
        (
            "serve --data-dir D --grpc-port 50052 --num-cpus 4",
            {"data_dir": "D", "grpc_port": 50052, "num_cpus": 4},
        ),
        ("tune --data-dir D --namespace ns", {"data_dir": "D", "namespace": "ns"}),
        (
            "study run sft-10-seed2 illume-paper-seed3 --pool 40 --rounds 2 --work W",
            {
                "names": ["sft-10-seed2", "illume-paper-seed3"],
                "pool": 40,
                "rounds": 2,
                "work": "W",
                "verb": "run",
            },
        ),
        ("study report --seeds 2 3 --out O", {"seeds": [2, 3], "out": "O", "verb": "report"}),
    ],
)
def test_request_flags_keep_their_spelling(argv, expected):
    args = build_parser().parse_args(argv.split())
    assert {key: getattr(args, key) for key in expected} == expected
    assert callable(args.func)


def test_an_illume_error_is_reported_with_exit_status_2(monkeypatch, capsys):
    import illume.cli.simulate as simulate_verb
    from illume.errors import NotFound

    def fail(args):
        raise NotFound("no world here\nand no second line")

    monkeypatch.setattr(simulate_verb, "run", fail)
    assert main(["simulate", "--rounds", "1"]) == 2
    assert capsys.readouterr().err == "error: no world here\n"


def test_a_bad_study_run_name_exits_2_with_the_reason_before_anything_runs(tmp_path, capsys):
    records = tmp_path / "records"
    argv = ["study", "run", "sft-10-seed2", "sft-0-seed2", "--records", str(records), "--work", str(tmp_path)]
    assert main(argv) == 2
    assert "an SFT share is a percent in (0, 100]: 'sft-0-seed2'" in capsys.readouterr().err
    assert not records.exists()


def test_serve_runs_the_config_its_flags_built(tmp_path, monkeypatch):
    import services.local

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    seen = {}

    def run_forever(
        data_dir, model_dir, config_file, grpc_port, num_cpus, config=None, host=None, http_port=None
    ):
        seen.update(
            data_dir=data_dir,
            grpc_port=grpc_port,
            num_cpus=num_cpus,
            config=config,
            host=host,
            http_port=http_port,
        )
        return 0

    monkeypatch.setattr(services.local, "run_forever", run_forever)
    argv = [
        "serve",
        "--data-dir",
        str(tmp_path),
        "--model",
        str(tmp_path),
        "--grpc-port",
        "50999",
        "--http-port",
        "8999",
    ]
    assert main([*argv, "--lr", "0.002", "--max-batch-size", "4", "--no-tuning"]) == 0
    config = seen["config"]
    assert (seen["data_dir"], seen["grpc_port"], seen["num_cpus"]) == (tmp_path, 50999, 8)
    assert seen["host"] == "127.0.0.1"  # --host's default: loopback only
    assert seen["http_port"] == 8999
    assert config.web.session_secret_file == tmp_path.resolve() / "keys" / "web-session.secret"
    assert config.tuning.train.learning_rate == 0.002 and config.tuning.train.lora_r == 16
    assert config.generator.max_batch_size == 4 and config.tuning.enabled is False
    assert config.generator.model.path == tmp_path.resolve()
