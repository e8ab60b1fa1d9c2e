"""The ``python -m sampler.serve`` command line: every bad value is refused before anything
starts (a usage error naming its option, exit status 2, no traceback), every option has help,
``--log-level`` takes uvicorn's levels in any case, ``--engine-arg KEY=VALUE`` reaches the
engines. Only the last test starts a server (``engine``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import uvicorn

from sampler.serve import cli
from sampler.tiny import write_tiny_model
from tests.http_helpers import ROOT, ServerProcess

#: Every spelling --log-level must take, and the level it stands for.
LEVEL_SPELLINGS = {
    **{name: name for name in cli.LOG_LEVELS},
    **{name.upper(): name for name in cli.LOG_LEVELS},
    **{name.title(): name for name in cli.LOG_LEVELS},
    "warn": "warning",
    "WARN": "warning",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "qwen3", "Qwen3ForCausalLM")


@pytest.fixture
def saved_logging():
    """The loggers ``configure_logging`` and uvicorn change, put back after the test."""
    names = ["sampler", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", ""]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate) for lg in map(logging.getLogger, names)]
    yield
    for lg, level, handlers, propagate in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def parse(*argv: str, model: str = "m", check_model_path: bool = False):
    return cli.parse_args(["--model-path", model, *argv], check_model_path=check_model_path)


def refused(capsys, *argv: str, **kw) -> str:
    """The usage error ``argv`` gets (argparse's: exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv, **kw)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err, err
    return err


# ---------------------------------------------------------------------------------- help


def test_every_option_has_help_and_shows_its_default(capsys):
    parser = cli.build_parser()
    options = [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]
    assert len(options) >= 22  # the 21 options there were, and --engine-arg
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in options:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text, flag
        if not (action.required or action.default is None or action.default is False):
            assert f"(default: {action.default})" in text, action.option_strings
    assert "(default: warning)" in text and "(default: 30000)" in text
    assert "--engine-arg mem_fraction_static=0.5" in text  # an example


# ---------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--port", "65536"], "--port"),
        (["--port", "-1"], "--port"),
        (["--port", "http"], "--port"),
        (["--base-port", "0"], "--base-port"),
        (["--base-port", "70000"], "--base-port"),
        (["--tp-size", "0"], "--tp-size"),
        (["--tp", "two"], "--tp-size"),
        (["--data-parallel-size", "0"], "--data-parallel-size"),
        (["--num-servers", "-2"], "--num-servers"),
        (["--num-servers", "4", "--base-port", "65534"], "--base-port"),
        (["--num-servers", "2", "--data-parallel-size", "3"], "--data-parallel-size"),
        (["--context-length", "0"], "--context-length"),
        (["--max-running-requests", "0"], "--max-running-requests"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-batch-size", "1.5"], "--max-batch-size"),
        (["--max-engine-restarts", "-1"], "--max-engine-restarts"),
        (["--reload-timeout", "0"], "--reload-timeout"),
        (["--reload-timeout", "inf"], "--reload-timeout"),
        (["--graceful-timeout", "-1"], "--graceful-timeout"),
        (["--graceful-timeout", "nan"], "--graceful-timeout"),
        (["--admin-token", ""], "--admin-token"),
        (["--api-key", " key "], "--api-key"),
        (["--load-format", "pt"], "--load-format"),
        (["--log-level", "verbose"], "--log-level"),
        (["--engine-arg", "mem_fraction_static"], "--engine-arg"),
    ],
)
def test_a_bad_value_is_refused_naming_its_option(capsys, argv, option):
    assert option in refused(capsys, *argv)


def test_edge_values_that_make_sense_are_taken():
    assert parse("--port", "0").port == 0  # a free port, as before
    assert parse("--port", "65535", "--base-port", "1").base_port == 1
    assert parse("--max-engine-restarts", "0").max_engine_restarts == 0  # never rebuild
    assert parse("--graceful-timeout", "0").graceful_timeout == 0.0
    assert parse("--num-servers", "2", "--base-port", "65534").num_servers == 2
    defaults = parse()
    assert (defaults.port, defaults.tp, defaults.log_level, defaults.engine_kwargs) == (30000, 1, "warning", {})


def test_the_model_path_is_checked_before_anything_starts(capsys, tmp_path, tiny_model):
    missing = tmp_path / "missing"
    assert str(missing) in refused(capsys, model=str(missing), check_model_path=True)
    (tmp_path / "file").write_text("")
    assert "not a directory" in refused(capsys, model=str(tmp_path / "file"), check_model_path=True)
    assert "config.json" in refused(capsys, model=str(tmp_path), check_model_path=True)
    no_weights = write_tiny_model(tmp_path / "no-weights", "Qwen3ForCausalLM", weights=False)
    assert "safetensors" in refused(capsys, model=str(no_weights), check_model_path=True)
    assert parse("--load-format", "dummy", model=str(no_weights), check_model_path=True).load_format == "dummy"
    assert parse(model=str(tiny_model), check_model_path=True).model_path == str(tiny_model)
    assert parse(model=str(missing)).model_path == str(missing)  # parse_args alone: no file system check


# ---------------------------------------------------------------------------------- --log-level


@pytest.mark.parametrize("spelling", sorted(LEVEL_SPELLINGS))
def test_log_level_takes_every_level_in_any_case(spelling):
    assert parse("--log-level", spelling).log_level == LEVEL_SPELLINGS[spelling]


def test_a_bad_log_level_names_the_allowed_ones(capsys):
    err = refused(capsys, "--log-level", "verbose")
    assert "--log-level" in err and "verbose" in err
    for name in cli.LOG_LEVELS:
        assert name in err, name


@pytest.mark.parametrize("name", list(cli.LOG_LEVELS))
def test_every_log_level_works_for_uvicorn_and_the_library(name, saved_logging, capsys):
    level = cli.LOG_LEVELS[name]
    cli.configure_logging(parse("--log-level", name.upper()).log_level)
    logging.getLogger().setLevel(logging.ERROR)  # what sglang-jax does to the root logger when an engine starts
    library = logging.getLogger("sampler.serve")
    assert library.isEnabledFor(level) and not library.isEnabledFor(level - 1)
    library.log(level, "at %s", name)
    err = capsys.readouterr().err
    assert f"sampler.serve {logging.getLevelName(level)}: at {name}" in err, err
    assert err.count(f"at {name}") == 1  # once: not also through the root logger's handlers
    uvicorn.Config(app=lambda *a: None, log_level=name, log_config=None)  # uvicorn takes the name (a KeyError before)
    assert logging.getLogger("uvicorn.error").level == level


# ---------------------------------------------------------------------------------- --engine-arg


def engine_kwargs_of(*items: str) -> dict:
    return parse(*[arg for item in items for arg in ("--engine-arg", item)]).engine_kwargs


def test_engine_arg_values_are_json_when_they_parse_and_text_otherwise():
    assert engine_kwargs_of(
        "mem_fraction_static=0.5",
        "quantization_config_path=int8.yaml",
        "max_prefill_tokens=4096",
        "disable_precompile=true",
        "enable_lora=null",
        "precompile_bs_paddings=[1, 2, 4]",
        'limit_mm_data_per_request={"image": 2}',
        "dtype=bfloat16",
        "page-size=1",  # '-' for '_'
        "tokenizer_path=a=b",  # the first '=' splits
    ) == {
        "mem_fraction_static": 0.5,
        "quantization_config_path": "int8.yaml",
        "max_prefill_tokens": 4096,
        "disable_precompile": True,
        "enable_lora": None,
        "precompile_bs_paddings": [1, 2, 4],
        "limit_mm_data_per_request": {"image": 2},
        "dtype": "bfloat16",
        "page_size": 1,
        "tokenizer_path": "a=b",
    }
    # a field that takes text gets the text as written (and a JSON string its value)
    assert engine_kwargs_of("served_model_name=123", 'json_model_override_args={"a": 1}') == {
        "served_model_name": "123",
        "json_model_override_args": '{"a": 1}',
    }
    assert engine_kwargs_of('served_model_name="quoted"') == {"served_model_name": "quoted"}
    assert engine_kwargs_of("dtype_config={}") == {"dtype_config": {}}  # takes text or an object


def test_an_unknown_engine_arg_is_refused_naming_it(capsys):
    err = refused(capsys, "--engine-arg", "mem_fracton_static=0.5")
    assert "--engine-arg" in err and "mem_fracton_static" in err and "did you mean 'mem_fraction_static'" in err
    err = refused(capsys, "--engine-arg", "no_such_option_at_all=1")
    assert "--engine-arg" in err and "no_such_option_at_all" in err


@pytest.mark.parametrize(
    "key, option",
    [
        ("model_path", "--model-path"),
        ("load_format", "--load-format"),
        ("tp_size", "--tp-size"),
        ("context_length", "--context-length"),
        ("max_running_requests", "--max-running-requests"),
        ("port", "--port"),
        ("host", "--host"),
        ("api_key", "--api-key"),
        ("device_indexes", "--data-parallel-size"),
        ("enable_single_process", "this process"),
    ],
)
def test_an_engine_arg_the_server_sets_is_refused(capsys, key, option):
    err = refused(capsys, "--engine-arg", f"{key}=1")
    assert "--engine-arg" in err and repr(key) in err and option in err, err


@pytest.mark.parametrize(
    "items, words",
    [
        (["mem_fraction_static"], ["KEY=VALUE", "mem_fraction_static"]),
        (["=0.5"], ["KEY=VALUE"]),
        (["mem_fraction_static=lots"], ["mem_fraction_static", "float"]),
        (["disable_precompile=yes"], ["disable_precompile", "bool"]),
        (["max_prefill_tokens=1.5"], ["max_prefill_tokens", "int"]),
        (["random_seed=null"], ["random_seed", "int"]),
        (["page_size=1", "page-size=2"], ["page_size", "more than once"]),
    ],
)
def test_a_malformed_engine_arg_is_refused(capsys, items, words):
    err = refused(capsys, *[arg for item in items for arg in ("--engine-arg", item)])
    assert "--engine-arg" in err, err
    for word in words:
        assert word in err, (word, err)


def test_the_keys_the_server_sets_are_engine_options():
    fields = cli.server_arg_types()
    assert set(cli.ENGINE_ARGS_SET_BY_SERVER) <= set(fields)
    assert set(cli.ENGINE_ARGS_TO_CONFIG) <= set(fields)


# ---------------------------------------------------------------------------------- end to end


#: Command lines ``python -m sampler.serve`` refuses before anything starts, and words its error names.
REFUSED_COMMAND_LINES = {
    "log-level": (["--log-level", "verbose"], ["--log-level", "verbose", "critical", "trace"]),
    "engine-arg": (["--engine-arg", "mem_fracton_static=0.5"], ["--engine-arg", "mem_fraction_static"]),
    "model-path": (["--model-path", "{missing}"], ["--model-path", "{missing}"]),
}


@pytest.fixture(scope="module")
def refused_runs(tiny_model, tmp_path_factory):
    """Each of ``REFUSED_COMMAND_LINES`` run as a child process (all at once): (exit status, output)."""
    missing = str(tmp_path_factory.mktemp("cli-missing") / "no-model")
    procs = {}
    for name, (argv, _) in REFUSED_COMMAND_LINES.items():
        argv = [a.format(missing=missing) for a in argv]
        cmd = [sys.executable, "-m", "sampler.serve", "--model-path", str(tiny_model), "--log-level", "info", *argv]
        procs[name] = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            cwd=ROOT,
        )
    runs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        runs[name] = proc.returncode, out, missing
    return runs


@pytest.mark.parametrize("name", list(REFUSED_COMMAND_LINES))
def test_the_server_refuses_a_bad_command_line_before_anything_starts(refused_runs, name):
    code, out, missing = refused_runs[name]
    assert code == 2, out
    assert "usage: python -m sampler.serve" in out and "error:" in out, out
    assert "Traceback" not in out, out
    for word in REFUSED_COMMAND_LINES[name][1]:
        assert word.format(missing=missing) in out, (word, out)
    # nothing started: no engine (its first log line at --log-level info), no HTTP server
    assert "starting the sglang-jax engine" not in out and "listening on" not in out, out


@pytest.mark.engine
def test_log_level_and_engine_args_reach_a_running_server(tiny_model, tmp_path):
    srv = ServerProcess(
        tiny_model,
        tmp_path / "server.log",
        "--log-level",
        "INFO",  # after ServerProcess's own --log-level: this one counts
        "--engine-arg",
        "served_model_name=cli-test-model",
        "--engine-arg",
        "schedule-conservativeness=0.5",
        "--engine-arg",
        "random_seed=7",  # SamplerConfig.random_seed (engine i of several: 7 + i)
        "--context-length",
        "128",
        "--max-running-requests",
        "2",
        "--no-warmup",
    )
    try:
        srv.wait_ready()
        code, body, _ = srv.call("/health")
        assert code == 200, body
        code, info, _ = srv.call("/get_server_info")  # upstream's route: the engine's ServerArgs
        assert code == 200, info
        assert info["served_model_name"] == "cli-test-model"
        assert info["schedule_conservativeness"] == 0.5 and info["random_seed"] == 7
        assert info["max_running_requests"] == 2 and info["context_length"] == 128
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(120) == 0, srv.log.read_text()[-3000:]
        log = srv.log.read_text()
        # uvicorn at INFO (its access log) and the library at INFO, also after the engine started
        assert '"GET /health HTTP/1.1" 200' in log, log[-3000:]
        assert "sampler.engine.handle INFO: starting the sglang-jax engine" in log, log[-3000:]
        assert "sampler.serve INFO: signal 15: shutting down" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        srv.stop()


def test_a_configuration_the_engine_refuses_is_a_clear_error_without_traceback(tiny_model):
    """Past the command line: a value only the engine start can judge (tp over more devices than
    the process has) ends the server with one line naming the problem, and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "sampler.serve", "--model-path", str(tiny_model), "--tp", "8", "--no-warmup"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "sampler.serve: the engine could not start" in out and "tp" in out, out
    assert "Traceback" not in out, out


def test_a_quantized_server_reloads_checkpoints_quantized(tmp_path):
    """--quantization int8: the server starts on checkpoint A quantized by sglang-jax, and a
    /admin/reload_weights of checkpoint B serves B quantized bit for bit as an engine that loaded
    B would (the checksum equals converters.fingerprint_params of B told the quantization)."""
    import converters
    from tests import helpers

    path_a = helpers.write_case(tmp_path / "a", "qwen3-tied", seed=0)
    path_b = helpers.write_case(tmp_path / "b", "qwen3-tied", seed=1)
    srv = ServerProcess(path_a, tmp_path / "server.log", "--quantization", "int8", "--no-warmup")
    try:
        srv.wait_ready()
        status = srv.status()
        assert status["quantization"] == {"linear": "int8", "moe": None, "skipped": []}
        spec = converters.ModelSpec.from_hf_config(path_a)
        a, b = (helpers.hf_tensors(p) for p in (path_a, path_b))
        code, body, _ = srv.admin("/admin/weights_checksum")
        assert code == 200 and body["checksum"] == converters.fingerprint_params(a, spec, quantization="int8")
        code, body, _ = srv.admin("/admin/reload_weights", {"model_path": str(path_b)})
        assert code == 200, body
        code, body, _ = srv.admin("/admin/weights_checksum")
        assert code == 200 and body["checksum"] == converters.fingerprint_params(b, spec, quantization="int8")
        assert body["checksum"] != converters.fingerprint_params(b, spec)
    finally:
        srv.stop()
