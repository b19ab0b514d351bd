"""One spelling per concept across the CLI, the old spellings' rewrite, help defaults, and the lock list."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from lesionstack.cli import app
from lesionstack.cli.common import LOCKS, READS_ONLY, fold_list, modernise

REPO = Path(__file__).resolve().parents[1]
GROUP = typer.main.get_group(app)
COMMANDS = dict(GROUP.commands)

# concept (parameter name) -> its one spelling: (flags, type, default); positional concepts have no flags
CONCEPTS = {
    "artifacts": (["--artifacts", "-a"], "path", "artifacts"),
    "folds_only": (["--folds-only"], "text", ""),
    "config": (["--config"], "path", None),
    "device": (["--device"], "text", "auto"),
    "folds": (["--folds"], "path", None),  # a fold FILE; its default is ARTIFACTS/folds.csv
}
POSITIONAL_DATA = {"folds", "train-cnn", "train-diagnosis", "features", "run", "predict", "distill", "phone-eval",
                   "export", "report"}


def _options(command: typer.core.TyperCommand) -> dict[str, typer.core.TyperOption]:
    return {p.name: p for p in command.params}


def _kind(param: typer.core.TyperOption) -> str:
    annotation = repr(param.type_descriptor.annotation)
    return "path" if "Path" in annotation else "text" if "str" in annotation else annotation


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_follows_the_concept_table(name: str) -> None:
    params = _options(COMMANDS[name])
    for concept, (flags, kind, default) in CONCEPTS.items():
        if concept in params:
            p = params[concept]
            assert p.param_type_name == "option" and p.opts + p.secondary_opts == flags, (name, concept, p.opts)
            assert _kind(p) == kind, (name, concept, _kind(p))
            assert p.default == default or str(p.default) == str(default), (name, concept, p.default)
    for p in params.values():
        flags = getattr(p, "opts", [])
        assert not {"--data", "--data-dir"} & set(flags), f"{name}: the data folder is the positional argument"
        if "--out" in flags:
            assert "artifacts root" not in (p.help or "").lower(), f"{name} --out names the artifacts root"
    if name in POSITIONAL_DATA:
        assert params["data"].param_type_name == "argument", name
    if name not in ("demo-data", "train-seg", "compare"):  # compare reads several roots, named in order
        assert "artifacts" in params, f"{name} takes no --artifacts"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_values_not_dataclass_names(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0
    params = _options(COMMANDS[name])
    text = " ".join(f"{p.help} {p.show_default}" for p in params.values() if p.param_type_name == "option")
    assert "Config." not in text and "Spec." not in text and "Settings." not in text, text
    if "config" in params:
        assert "Omitted: no file is read; the built-in" in params["config"].help


def test_help_defaults_are_the_dataclass_values() -> None:
    from lesionstack.data.synthetic import DemoSpec
    from lesionstack.folds import FoldsConfig
    from lesionstack.tabular.tune import TuneSettings

    table = {("demo-data", "patients"): (DemoSpec, "patients"), ("demo-data", "seed"): (DemoSpec, "seed"),
             ("demo-data", "lesions_per_patient"): (DemoSpec, "lesions_per_patient"),
             ("demo-data", "positive_rate"): (DemoSpec, "positive_rate"),
             ("demo-data", "masks"): (DemoSpec, "mask_count"),
             ("demo-data", "test_fraction"): (DemoSpec, "test_fraction"),
             ("folds", "n_folds"): (FoldsConfig, "n_folds"),
             ("folds", "seed"): (FoldsConfig, "seed"), ("folds", "method"): (FoldsConfig, "method"),
             ("folds", "group"): (FoldsConfig, "group"), ("tune", "model"): (TuneSettings, "model"),
             ("tune", "n_trials"): (TuneSettings, "n_trials"), ("tune", "seed"): (TuneSettings, "seed")}
    for (command, option), (cls, field) in table.items():
        shown = _options(COMMANDS[command])[option].show_default
        default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
        assert shown == str(default), (command, option, shown, default)


def test_debug_is_in_the_help() -> None:
    assert "--debug" in CliRunner().invoke(app, ["--help"]).output


@pytest.mark.parametrize(("name", "old", "new"), [
    ("train-stack", ["--out", "A"], ["--artifacts", "A"]),
    ("run", ["D", "--out=A"], ["D", "--artifacts=A"]),
    ("serve", ["A", "--port", "8001"], ["--artifacts", "A", "--port", "8001"]),
    ("package", ["A", "--out", "K"], ["--artifacts", "A", "--out", "K"]),
    ("report", ["A", "--data-dir", "D", "--out", "R"], ["--artifacts", "A", "--out", "R", "D"]),
    ("distill", ["--out", "A", "--data", "D"], ["--artifacts", "A", "D"]),
    ("train-diagnosis", ["D", "--folds-only", "0", "--folds-only", "1"], ["D", "--folds-only", "0,1"]),
])
def test_old_spellings_still_work_with_one_notice_each(name: str, old: list[str], new: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert modernise(name, COMMANDS[name], old) == new
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("lesionstack: deprecated: ") for line in err)


def test_a_positional_data_folder_stays_where_today_takes_one(tmp_path: Path, capsys) -> None:
    data, art = tmp_path / "data", tmp_path / "art"
    data.mkdir()
    (data / "train-metadata.csv").write_text("isic_id\n")
    art.mkdir()
    (art / "source.json").write_text("{}")
    assert modernise("report", COMMANDS["report"], [str(data)]) == [str(data)]  # today's DATA
    assert modernise("report", COMMANDS["report"], [str(art)]) == ["--artifacts", str(art)]  # yesterday's
    assert capsys.readouterr().err.count("deprecated") == 1


def test_fold_lists_have_one_type() -> None:
    assert fold_list("0,1") == [0, 1] and fold_list(" 2 ") == [2] and fold_list("") is None
    with pytest.raises(typer.BadParameter):
        fold_list("one")
    for name in ("train-cnn", "train-diagnosis", "distill"):
        assert _kind(_options(COMMANDS[name])["folds_only"]) == "text"


def test_the_lock_list_covers_every_writing_command() -> None:
    """Every command with an artifacts root either reads it only or is in the one lock list, and each listed
    command takes the lock by its own name (read from the source: a command can't quietly skip it)."""
    assert set(LOCKS) <= set(COMMANDS)
    for name, command in COMMANDS.items():
        if "artifacts" in _options(command):
            assert (name in LOCKS) != (name in READS_ONLY), name
    calls: dict[str, str] = {}
    for path in (REPO / "src" / "lesionstack" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_cmd"):
                for call in ast.walk(node):
                    if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "artifacts_lock":
                        calls[node.name] = call.args[0].value  # type: ignore[attr-defined]
    assert sorted(calls.values()) == sorted(LOCKS)
    for function, name in calls.items():
        assert function == name.replace("-", "_") + "_cmd"


def test_a_held_lock_refuses_the_commands_that_skipped_it(tmp_path: Path) -> None:
    """train-diagnosis, distill, phone-eval and export took no lock before: now a second command waits its turn."""
    from lesionstack.cli import main
    from lesionstack.lock import run_lock

    art, data = tmp_path / "art", tmp_path / "data"
    (art / "distill" / "s").mkdir(parents=True)
    data.mkdir()
    (data / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")  # a diagnosis layout, found
    with run_lock(art):
        for argv in (["train-diagnosis", str(data), "-a", str(art)], ["phone-eval", str(data), "-a", str(art)],
                     ["export", str(data), "-a", str(art)]):
            with pytest.raises(SystemExit) as stopped:
                main(argv)
            assert stopped.value.code == 13, argv


def test_distill_and_phone_eval_hand_their_stage_one_config(tmp_path: Path, monkeypatch) -> None:
    """The student's name (--name, else the config's `name`, else the config file's stem) and phone-eval's
    model and seed reach the stage inside its one config (the stage contract: data, artifacts, config)."""
    from lesionstack import preflight
    from lesionstack.cli import main
    from lesionstack.train import distill, robustness

    art, data = tmp_path / "art", tmp_path / "data"
    art.mkdir()
    data.mkdir()
    (art / "folds.csv").write_text("isic_id,patient_id,target,fold\n")
    seen: list[object] = []
    monkeypatch.setattr(preflight, "check_data", lambda *a, **k: None)  # what is checked here is the hand-off
    monkeypatch.setattr(distill, "distill_stage", lambda d, a, cfg, **k: seen.append(cfg.student) or "done")
    monkeypatch.setattr(robustness, "phone_stage", lambda d, a, cfg, **k: seen.append(cfg) or "done")
    named = tmp_path / "named.yaml"
    named.write_text(f"base: {REPO / 'configs' / 'distill' / 'demo.yaml'}\nname: from_yaml\n")
    for extra in (["--config", str(REPO / "configs" / "distill" / "demo_phone.yaml")],
                  ["--config", str(REPO / "configs" / "distill" / "demo_phone.yaml"), "--name", "mine"],
                  ["--config", str(named)], []):
        with pytest.raises(SystemExit) as done:
            main(["distill", str(data), "-a", str(art), *extra])
        assert done.value.code == 0, extra
    with pytest.raises(SystemExit):
        main(["phone-eval", str(data), "-a", str(art), "--model", "demo", "--seed", "3"])
    assert seen[:4] == ["demo_phone", "mine", "from_yaml", "default"]
    assert (seen[4].model, seen[4].seed) == ("demo", 3)  # type: ignore[attr-defined]
