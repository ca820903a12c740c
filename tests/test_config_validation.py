"""Every configuration value is checked at start-up: type, range, choices, tables, and each
plugin's own [plugins.<name>] table. A bad value stops the server with one line naming the key
and what it takes (exit code 2), never a traceback and never a server that misbehaves later."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imagesearch.plugins import PluginContext, Setting, SettingsError
from imagesearch.plugins.manager import BLOCK_ENV, PluginRegistry
from imagesearch.server.cli import main
from imagesearch.server.config import LIMIT_RULES, SERVER_RULES, Limits, ServerConfig, load_config


def load(tmp_path: Path, toml: str) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text(toml)
    return load_config(path)


REFUSED = [  # (TOML, what the message must say)
    ("port = -5", "port must be an integer from 0 to 65535 (0 picks a free port), got -5"),
    ("port = 65536", "port must be an integer from 0 to 65535"),
    ('port = "80"', "port must be an integer from 0 to 65535 (0 picks a free port), got '80'"),
    ("port = true", "port must be an integer from 0 to 65535 (0 picks a free port), got True"),
    ("workers = 0", "workers must be an integer >= 1, got 0"),
    ("workers = 2.5", "workers must be an integer >= 1, got 2.5"),
    ("batch_max_wait_ms = -1", "batch_max_wait_ms must be a number >= 0"),
    ("snapshot_interval_s = 0", "snapshot_interval_s must be a number > 0, got 0"),
    ("snapshot_interval_s = nan", "snapshot_interval_s must be a number > 0, got nan"),
    ("shutdown_grace_s = inf", "shutdown_grace_s must be a number from 0 to 86400 (at most a day), got inf"),
    ("shutdown_grace_s = 1e300", "shutdown_grace_s must be a number from 0 to 86400"),
    ("shutdown_announce_s = 1e300", "shutdown_announce_s must be a number from 0 to 86400"),
    (
        "[limits]\nmax_concurrent_rpcs = 2147483648",
        "[limits] max_concurrent_rpcs must be an integer from 1 to 2147483647",
    ),
    ("thumbnail_quality = 101", "thumbnail_quality must be an integer from 1 to 100 (JPEG quality)"),
    ('create_default_collection = "yes"', "create_default_collection must be true or false, got 'yes'"),
    ("host = 5", "host must be a string that is not blank (an interface name or address), got 5"),
    ('data_dir = ""', "data_dir must be a path (a non-empty string), got ''"),
    ("models_dir = 3", "models_dir must be a path (a non-empty string), got 3"),
    ('log_format = "xml"', "log_format must be one of 'json', 'text', got 'xml'"),
    ('log_level = "LOUD"', "log_level must be one of 'DEBUG', 'debug', 'INFO'"),
    ("prot = 1", "unknown configuration keys: prot"),
    ("limits = 5", "limits must be a table, got 5"),
    ("[limits]\nmax_batch_size = -1", "[limits] max_batch_size must be an integer >= 1, got -1"),
    ('[limits]\nmax_batch_size = "10"', "[limits] max_batch_size must be an integer >= 1, got '10'"),
    ("[limits]\nmax_batch_size = false", "[limits] max_batch_size must be an integer >= 1, got False"),
    ("[limits]\nmax_message_bytes = 0", "[limits] max_message_bytes must be an integer from 65536 to"),
    ("[limits]\nmax_message_bytes = 65535", "got 65535"),
    ("[limits]\nmax_message_bytes = 2147483648", "got 2147483648"),
    ("[limits]\nstream_idle_timeout_s = 0", "[limits] stream_idle_timeout_s must be a number > 0"),
    ("[limits]\nmax_hnsw_m = 1", "[limits] max_hnsw_m must be an integer >= 2 (HNSW needs m >= 2)"),
    ("[limits]\nmax_metadata_entries = -1", "[limits] max_metadata_entries must be an integer >= 0"),
    ("[limits]\nmax_topk = 3", "unknown [limits] keys: max_topk"),
    ("[limits]\nmax_top_k = 5", "[limits] default_top_k (10) must not exceed max_top_k (5)"),
    ("[limits]\ndefault_page_size = 2000", "[limits] default_page_size (2000) must not exceed max_page_size"),
    ("[limits]\nmax_rerank_candidates = 10", "default_rerank_candidates (50) must not exceed"),
    ("plugins = 5", "plugins must be a table, got 5"),
    ("[plugins]\nsift = 5", "[plugins.sift] must be a table of settings, got 5"),
]


@pytest.mark.parametrize(("toml", "message"), REFUSED, ids=[t.replace("\n", " ") for t, _ in REFUSED])
def test_a_bad_value_is_refused_naming_the_key_and_what_it_takes(tmp_path, toml, message):
    with pytest.raises(ValueError) as refused:
        load(tmp_path, toml)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


ACCEPTED = [  # (TOML, the field, the value it loads as)
    ("port = 0", "port", 0),
    ("port = 65535", "port", 65535),
    ("batch_max_wait_ms = 0", "batch_max_wait_ms", 0),
    ("snapshot_interval_s = 2", "snapshot_interval_s", 2),  # a float setting takes an integer
    ('log_level = "debug"', "log_level", "debug"),
    ('data_dir = "/srv/x"', "data_dir", Path("/srv/x")),
    ("[limits]\nmax_message_bytes = 65536", "limits.max_message_bytes", 65536),
    ("[limits]\nmax_metadata_entries = 0", "limits.max_metadata_entries", 0),
    ("[plugins.sift]\nmax_side = 480", "plugins", {"sift": {"max_side": 480}}),
]


@pytest.mark.parametrize(
    ("toml", "key", "value"), ACCEPTED, ids=[t.replace("\n", " ") for t, _, _ in ACCEPTED]
)
def test_a_value_within_its_rule_loads(tmp_path, toml, key, value):
    config = load(tmp_path, toml)
    section, _, name = key.rpartition(".")
    assert getattr(getattr(config, section) if section else config, name) == value


def test_every_field_has_a_rule_its_default_satisfies():
    """A field added later gets its type's rule at once; its default must pass it."""
    defaults, limits = dataclasses.asdict(ServerConfig()), dataclasses.asdict(Limits())
    assert set(SERVER_RULES) == set(defaults) - {"limits", "plugins"}
    assert set(LIMIT_RULES) == set(limits)
    assert all(rule.accepts(defaults[key]) for key, rule in SERVER_RULES.items())
    assert all(rule.accepts(limits[key]) for key, rule in LIMIT_RULES.items())


def test_command_line_overrides_are_checked_too():
    with pytest.raises(ValueError, match="port must be an integer from 0 to 65535"):
        load_config(port=70000)


@pytest.mark.parametrize("key", ["host", "default_extractor"])
@pytest.mark.parametrize("blank", ["", " ", "\\t "])
def test_an_empty_name_is_refused(tmp_path, key, blank):
    """``host = ""`` started, then failed at bind time with a message naming no key (an outside test);
    ``host = " "`` got past the check the same way (the next outside test)."""
    path = tmp_path / "server.toml"
    path.write_text(f'{key} = "{blank}"\n')
    with pytest.raises(ValueError, match=f"{key} must be a string that is not blank"):
        load_config(path, host="127.0.0.1")


@pytest.mark.parametrize("flag", ["--data", "--models", "--config"])
def test_an_empty_path_flag_is_refused_not_taken_for_the_current_directory(flag, capsys):
    """``--data "$UNSET"`` made the server keep its data where it was started (an outside test)."""
    from imagesearch.server import cli

    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["serve", flag, ""])
    assert exited.value.code == 2 and "must not be empty" in capsys.readouterr().err


def test_a_bad_file_value_is_refused_even_where_a_flag_overrides_it(tmp_path):
    """The file must start a server alone too (an outside test: `port = 70000` with `--port 0`
    started, and failed the day the flag was left off)."""
    path = tmp_path / "server.toml"
    path.write_text("port = 70000\n")
    with pytest.raises(ValueError, match="port must be an integer from 0 to 65535"):
        load_config(path, port=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config file"),
        ("port = ", "is not valid TOML"),
        (b"port = 1 # \xff", "is not valid TOML"),
    ],
)
def test_an_unreadable_or_malformed_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "server.toml"
    if isinstance(content, bytes):  # not UTF-8: the error named no file (an outside test)
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as refused:
        load_config(path)
    assert str(path) in str(refused.value)


PLUGIN_TABLES = [  # (plugin name, its table, what the message must say)
    (
        "sift",
        {"max_sides": 100_000},
        "unknown [plugins.sift] keys: max_sides (known: max_keypoints, max_side",
    ),
    ("sift", {"max_side": "big"}, "[plugins.sift] max_side must be an integer >= 1, got 'big'"),
    ("sift", {"vlad_pca_dim": -1}, "[plugins.sift] vlad_pca_dim must be an integer >= 0 (0: no PCA), got -1"),
    ("onnx_cnn", {"thread": 2}, "unknown [plugins.onnx_cnn] keys: thread"),
    ("onnx_cnn", {"threads": 0}, "[plugins.onnx_cnn] threads must be an integer from 1 to 1024, got 0"),
    ("onnx_cnn", {"threads": 99_999_999_999}, "[plugins.onnx_cnn] threads must be an integer from 1 to 1024"),
    # A plugin that reads no table: every key is unknown to it (accepted without a word: an outside test).
    ("metrics", {"threds": 4}, "unknown [plugins.metrics] keys: threds (plugin 'metrics' takes no settings)"),
]


@pytest.mark.parametrize(("plugin", "table", "message"), PLUGIN_TABLES)
def test_a_bad_plugin_table_stops_start_up(plugin, table, message):
    """Not a plugin problem that is logged and skipped: the registry (so the server) refuses to start."""
    with pytest.raises(SettingsError) as refused:
        PluginRegistry(load_entry_points=False, plugin_config={plugin: table})
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGESEARCH_ORT_THREADS", "abc"),
        ("IMAGESEARCH_ORT_MAX_BATCH", "0"),
        ("IMAGESEARCH_ORT_THREADS", "99999999999"),  # onnxruntime refused it with a TypeError
        ("IMAGESEARCH_ORT_THREADS", " 2"),
        ("IMAGESEARCH_ORT_THREADS", "\u0663"),  # an Arabic-Indic 3, which int() takes
    ],
)
def test_a_bad_onnx_environment_variable_stops_start_up_like_its_table_key(variable, value, monkeypatch):
    """A typo in the variable was a plugin problem, logged: the server served without its default
    CNN while health said SERVING, where the same value in [plugins.onnx_cnn] stops start-up (an
    outside test). Checked whether or not there are models."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        PluginRegistry(load_entry_points=False, plugin_config={})
    assert f"environment variable {variable}={value!r} must be an integer from 1 to 1024" in str(
        refused.value
    )


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        (Setting(float, low=0, high=1, above=True), "a number above 0 and at most 1"),
        (Setting(float, low=0, high=1), "a number from 0 to 1"),
        (Setting(float, low=0, above=True), "a number > 0"),
        (Setting(int, low=1), "an integer >= 1"),
    ],
)
def test_a_rule_says_whether_its_low_bound_is_allowed(rule, words):
    """A rule refusing 0 said "from 0 to 1", as if 0 were allowed (an outside test)."""
    assert rule.expected() == words


def test_an_exclusive_low_bound_is_said_in_the_message():
    context = PluginContext(config={"ratio": 0.0}, plugin="demo")
    with pytest.raises(SettingsError) as refused:
        context.settings({"ratio": Setting(float, low=0, high=1, above=True)})
    assert str(refused.value) == "[plugins.demo] ratio must be a number above 0 and at most 1, got 0.0"


def test_values_come_back_as_their_kind():
    """``ratio = 1`` in TOML is an int: a float setting returns 1.0 (it returned the int), a path a Path."""
    context = PluginContext(config={"ratio": 1, "cache": "/tmp/c", "size": 2}, plugin="demo")
    settings = context.settings({"ratio": Setting(float), "cache": Setting(Path), "size": Setting(int)})
    assert settings == {"ratio": 1.0, "cache": Path("/tmp/c"), "size": 2}
    assert [type(value) for value in settings.values()] == [float, type(Path("/tmp/c")), int]


def test_a_float_server_setting_written_as_an_integer_loads_as_a_float(tmp_path):
    config = load(tmp_path, "snapshot_interval_s = 2\n[limits]\nstream_idle_timeout_s = 30")
    assert type(config.snapshot_interval_s) is float and type(config.limits.stream_idle_timeout_s) is float


def test_a_good_plugin_table_reaches_the_plugin():
    context = PluginContext(config={"size": 3}, plugin="demo")
    assert context.settings({"size": Setting(int, low=1), "name": Setting(str)}) == {"size": 3}
    with pytest.raises(SettingsError, match=r"\[plugins.demo\] size must be an integer >= 5, got 3"):
        context.settings({"size": Setting(int, low=5)})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = -5\n", "error: port must be an integer from 0 to 65535 (0 picks a free port), got -5"),
        ("[plugins.sift]\nmax_sides = 100000\n", "error: unknown [plugins.sift] keys: max_sides"),
    ],
)
def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path, capfd, toml, message):
    """capfd, not capsys: a plugin table is checked as the server starts, which needs a real stderr."""
    config = tmp_path / "bad.toml"
    config.write_text(f"port = 0\n{toml}" if "port" not in toml else toml)
    assert main(["serve", "--config", str(config), "--data", str(tmp_path / "data")]) == 2
    err = capfd.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_table_for_no_loaded_plugin_is_reported_as_a_problem():
    """[plugins.sfit] for sift was ignored without a word, leaving sift on its defaults (an outside
    test); it is a plugin problem now, logged at start-up and listed by ListPlugins."""
    registry = PluginRegistry(load_entry_points=False, env={}, plugin_config={"sfit": {"max_side": 480}})
    assert any("[plugins.sfit] configures no loaded plugin" in p and "sift" in p for p in registry.problems)
    blocked = PluginRegistry(
        load_entry_points=False, env={BLOCK_ENV: "sift"}, plugin_config={"sift": {"max_side": 480}}
    )
    assert not any("[plugins.sift]" in p for p in blocked.problems)
