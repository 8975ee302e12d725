import json
import subprocess
import sys

import pytest

from echo_ray.cli import COMMANDS, build_parser, main


def test_synth_command_writes_an_archive(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path / "a"), "--studies", "3", "--image-size", "64",
          "--seed", "7", "--workers", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_studies"] == 3
    assert len(list((tmp_path / "a" / "files").rglob("*.dcm"))) == summary["num_images"]
    assert len(list((tmp_path / "a" / "files").rglob("s*.txt"))) == 3


def test_every_command_has_help():
    for name in COMMANDS:
        assert build_parser(name).format_help().startswith(f"usage: echo-ray {name}")


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "echo_ray.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path), "--out", str(tmp_path / "o"),
              "--preset", "gigantic"])
    assert exc.value.code == 2
    assert "unknown preset 'gigantic'" in capsys.readouterr().err


def test_missing_archive_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_rejects_unknown_config_key(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--set", "data.image_sise=3"])
    assert exc.value.code == 2
    assert "unknown config key 'data.image_sise'" in capsys.readouterr().err
