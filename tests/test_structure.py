"""The package's shape: a light core, the public names (a snapshot: a name
cannot appear or disappear unnoticed), one error base class, and the
docstring examples, run as doctests."""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

import remat
from remat import cli

PUBLIC = {
    "remat": [
        "Configuration", "CorpusError", "DumpFormatError", "MissingCheckpointNameError",
        "NoMemoryAnalysisError",
        "NeverKeptError", "NeverKeptWarning",
        "OffloadUnsupportedError", "OpaquePolicy", "PeakBuffer", "Policy", "PolicyNotTextError",
        "PolicySpecError", "RematError", "RematTargetError", "Report", "ResidualRow",
        "Compute", "HostTraffic", "Memory", "PeakBreakdown", "Residuals",
        "ScanCarryOffloadError", "SweepResult", "TARGETS", "Target", "TrainStep", "TrainStepSetup",
        "SearchPoint", "TuneResult", "Workload",
        "UnknownPolicyError", "UnsupportedJaxModeError", "analyze", "checkpoint", "checkpoint_names",
        "inspect_policy", "linen_workload", "models", "nnx", "nnx_workload", "plot_sweep", "policies",
        "remat", "scan_layers",
        "set_cpu_devices", "step", "sweep", "target_devices", "target_mesh",
        "testing", "train", "train_step_setup", "tune", "without_remat",
    ],
    "remat.policies": [
        "DotsRule", "OpaquePolicy", "Policy", "PolicyNotTextError", "PolicySpecError", "UnknownPolicyError",
        "UnsupportedJaxModeError", "describe", "get", "names", "register", "require_text", "vocab",
    ],
    "remat.models": [
        "PUBLISHED_PARAMS", "Attention", "Block", "Mlp", "ModelConfig", "Transformer",
        "attention_implementation", "from_hf_config", "from_maxtext_config",
        "get_config", "names", "nnx", "param_count", "rope", "vit",
    ],
    "remat.models.vit": ["LAYERS", "NnxViT", "ViT", "batch_shapes", "classification_loss"],
    "remat.models.nnx": ["APIS", "Attention", "Block", "LinenApply", "Mlp", "Transformer", "check_api",
                         "linen_params", "load_linen_params", "model_for_api"],
    "remat.nnx": ["LayerAxes", "remat", "scan_layers", "stack_layers"],
    "remat.testing": [
        "TOLERANCES", "NoMemoryAnalysisError", "assert_memory_ordered", "assert_policy_parity",
        "assert_saved_names", "compiled_op_count", "saved_names", "temp_bytes",
    ],
    "remat.step": ["OptimizerConfig", "StepFn", "default_attention", "init_train_state", "lm_loss",
                   "lm_workload", "make_lr_schedule", "make_optimizer", "make_train_step"],
    "remat.train": ["Preempted", "TrainConfig", "TrainResult", "load_config", "train"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_a_snapshot(module):
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_every_error_lives_in_one_module_and_is_a_remat_error_and_a_value_error():
    from remat import _errors

    errors = [getattr(remat, n) for n in remat.__all__ if n.endswith("Error")]
    assert len(errors) == 13
    assert all(issubclass(e, remat.RematError) and issubclass(e, ValueError) for e in errors)
    assert {e.__module__ for e in [*errors, remat.NeverKeptWarning]} == {"remat._errors"}
    assert sorted(_errors.__all__) == sorted(n for n in remat.__all__ if n.endswith(("Error", "Warning")))
    assert remat.testing.NoMemoryAnalysisError is remat.NoMemoryAnalysisError
    assert remat.policies.UnknownPolicyError is remat.UnknownPolicyError


def test_errors_are_built_one_way_message_then_keyword_fields():
    import inspect

    with_fields = []
    for name in remat.__all__:
        init = getattr(remat, name).__init__
        if name.endswith("Error") and init not in (ValueError.__init__, TypeError.__init__):
            params = list(inspect.signature(init).parameters.values())[1:]
            assert params[0].name == "message" and params[0].kind is params[0].POSITIONAL_OR_KEYWORD, name
            assert all(p.kind is p.KEYWORD_ONLY for p in params[1:]), name
            with_fields.append(name)
    assert sorted(with_fields) == ["MissingCheckpointNameError", "NeverKeptError", "RematTargetError",
                                   "UnknownPolicyError"]
    err = remat.MissingCheckpointNameError("m", missing=frozenset({"a"}), emitted=frozenset({"b"}))
    assert (str(err), err.missing, err.emitted) == ("m", {"a"}, {"b"})
    assert remat.NeverKeptError("m", names=frozenset({"a"})).names == {"a"}
    assert remat.UnknownPolicyError("m", name="x").name == "x"


def test_the_public_names_are_written_once():
    """``remat/__init__.pyi`` is the one list: each name written there once
    (``name as name``), ``__all__`` is that list, and ``__init__.py`` names none."""
    stub = pathlib.Path(remat.__file__).with_suffix(".pyi").read_text()
    init = pathlib.Path(remat.__file__).read_text()
    written = [a.name for node in ast.parse(stub).body if isinstance(node, ast.ImportFrom)
               for a in node.names if a.asname == a.name]  # re-exported as itself, as type checkers read it
    assert len(written) == len(set(written)) and sorted(written) == sorted(remat.__all__)
    assert "__all__" not in stub and not [n for n in PUBLIC["remat"] if f'"{n}"' in init and n != "remat"]


def test_policies_need_only_jax():
    """flax, optax, chex, rich, matplotlib and orbax made unimportable."""
    code = textwrap.dedent("""
        import sys
        for name in ("flax", "optax", "chex", "rich", "matplotlib", "orbax"):
            sys.modules[name] = None
        import remat.policies
        print(remat.policies.get("minimal").to_jax())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("SaveOnlyTheseNames(")


def test_the_cli_prints_one_line_for_bad_input_and_lets_a_bug_raise(capsys, monkeypatch):
    assert cli.main(["inspect", "--model", "tiny", "--policy", "minimall"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown remat policy 'minimall' (did you mean 'minimal' or "
                          "'minimal_offloaded'?); valid names: none, full,")
    assert err.count("\n") == 1 and "Traceback" not in err

    def bug(*args, **kwargs):
        raise ValueError("a genuine bug")

    monkeypatch.setattr("remat._sweep.inspect_policy", bug)
    with pytest.raises(ValueError, match="a genuine bug"):
        cli.main(["inspect", "--model", "tiny", "--policy", "minimal"])


LAYERS = [
    ("remat.policies", "remat._errors", "remat._compat", "remat._environment"),
    ("remat._call", "remat._jaxpr", "remat._residuals", "remat._apply", "remat._scan", "remat._flops",
     "remat._format", "remat._buffers", "remat._cache", "remat._memory", "remat._report", "remat._summary",
     "remat._analysis",
     "remat._mesh", "remat._targets", "remat._workload", "remat._files",
     "remat.testing", "remat.nnx"),
    ("remat.models", "remat.step", "remat._flax_workload"),
    ("remat._sweep", "remat._tune", "remat._data", "remat.train", "remat.cli", "remat"),
]
"""Dependencies run one way: policies -> core (apply, scan, analysis) -> models
(and their train step) -> tools (sweep, train, CLI, the lazy facade)."""


def _layer(module: str) -> int:
    return next(i for i, group in enumerate(LAYERS) for m in group
                if module == m or (module.startswith(m + ".") and m != "remat"))


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "remat"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "remat":
            out |= {sub if _is_module(sub := f"{node.module}.{a.name}") else node.module for a in node.names}
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_dependencies_run_one_way():
    root = pathlib.Path(remat.__file__).parent
    files = {"remat": root, "remat.policies": pathlib.Path(remat.policies.__file__).parent,
             "remat.models": pathlib.Path(remat.models.__file__).parent}
    upward = []
    for package, folder in files.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            if name == "remat":
                continue  # the facade: imports lazily, on attribute access
            upward += [f"{name} imports {dep}" for dep in _imports(path) if _layer(dep) > _layer(name)]
    assert upward == []


DOCTESTED = ["remat.policies.registry", "remat.policies.vocab", "remat._scan", "remat.models.config",
             "remat.models.hf",
             "remat._format", "remat.testing"]


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_train_config_field_has_a_flag():
    import dataclasses

    from remat.train import TrainConfig

    subcommands = next(a for a in cli.build_parser()._actions if a.dest == "command")
    dests = {a.dest for a in subcommands.choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - dests == set()


def test_one_version_and_one_list_of_apis():
    import tomllib

    from remat.models.nnx import APIS

    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert remat.__version__ == pyproject["project"]["version"]  # read from the package metadata
    assert cli.API_CHOICES == APIS
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["inspect", "--model", "tiny", "--api", "jax"])


def test_a_reader_that_goes_away_is_no_traceback():
    """``remat policies --json | head``: the pipe closed before remat writes is
    a quiet exit 1, as ``head`` expects of a filter, not a BrokenPipeError."""
    run = subprocess.Popen([sys.executable, "-m", "remat.cli", "policies", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    run.stdout.close()  # the reader is gone before the first write
    err = run.stderr.read()
    run.stderr.close()
    assert run.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
