"""Settings: properties files as Blynk writes them, environment, overrides."""

import pytest

from blynkota.config import PROJECT_ROOT, ConfigError, load_settings, parse_properties


def test_properties_format():
    text = (
        "# comment\n! also\nhttp.port = 8081\nserver.host:ota.local\n"
        "admin.pass=a=b\n\nlong=one\\\n two\n"
    )
    assert parse_properties(text) == {
        "http.port": "8081",
        "server.host": "ota.local",
        "admin.pass": "a=b",
        "long": "onetwo",
    }


def test_defaults_are_blynks(tmp_path):
    settings = load_settings({"data.folder": tmp_path}, environ={})
    assert (settings.http_port, settings.https_port) == (8080, 9443)
    assert (settings.admin_email, settings.admin_pass) == ("admin@blynk.cc", "admin")
    assert settings.uses_default_password
    assert settings.db_url == f"sqlite:///{tmp_path / 'blynkota.db'}"
    assert settings.ssl_cert == tmp_path / "tls" / "cert.pem"
    assert settings.ota_max_size == 16 * 1024 * 1024 and settings.ota_validate_image


def test_file_then_environment_then_overrides(tmp_path):
    properties = tmp_path / "server.properties"
    properties.write_text("http.port=1111\nhttps.port=2222\nserver.host=file.example\n")
    environ = {"BLYNKOTA_CONFIG": str(properties), "BLYNKOTA_HTTPS_PORT": "3333"}
    settings = load_settings({"server.host": "override.example"}, environ=environ)
    assert (settings.http_port, settings.https_port, settings.server_host) == (
        1111,
        3333,
        "override.example",
    )
    assert str(properties) in settings.source


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("http.port", "eighty", "http.port: 'eighty' is not a whole number"),
        ("https.port", "70000", "https.port: 70000 is not between"),
        ("ota.validate.image", "maybe", "not true or false"),
        ("allowed.administrator.ips", "10.0.0.0/33", "not a CIDR range"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({key: value}, environ={})


def test_missing_properties_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"BLYNKOTA_CONFIG": str(tmp_path / "nope.properties")})


def test_java_properties_syntax():
    """What java.util.Properties accepts: space or colon as separator, escapes, \\uXXXX."""
    text = (
        "http.port 8081\n"
        "server.host : ota.example\n"
        "admin.pass = p\\u00e4ss\\=word\n"
        "allowed.administrator.ips = 10.0.0.0/8,\\\n"
        "    192.168.0.0/16\n"
        "admin.email=ops\\@example.com\n"
    )
    assert parse_properties(text) == {
        "http.port": "8081",
        "server.host": "ota.example",
        "admin.pass": "päss=word",
        "allowed.administrator.ips": "10.0.0.0/8,192.168.0.0/16",
        "admin.email": "ops@example.com",
    }


def test_unknown_keys_are_named_with_the_closest_known_key(tmp_path):
    properties = tmp_path / "server.properties"
    properties.write_text("htpp.port=8081\nhttps.port=9444\nmy.own.key=1\n")
    settings = load_settings(properties_file=properties, environ={})
    assert settings.http_port == 8080 and settings.https_port == 9444  # the typo is not taken
    assert settings.warnings == (
        f"{properties}: unknown key 'htpp.port' ignored (did you mean http.port?)",
        f"{properties}: unknown key 'my.own.key' ignored",
    )


def test_unknown_environment_variables_are_named_with_the_closest_known_one():
    """BLYNKOTA_ADMIN_PASSWORD (for BLYNKOTA_ADMIN_PASS) must not pass unseen:
    the server would run with the default password."""
    environ = {
        "BLYNKOTA_ADMIN_PASSWORD": "s3cret",
        "BLYNKOTA_HTTP_PROT": "8081",
        "BLYNKOTA_NOTHING_LIKE_IT": "1",
        "BLYNKOTA_CONFIG_FILE": "x",
        "BLYNKOTA_URL": "https://ota.example:9443",  # the `blynkota` command's, known
        "OTHER_ADMIN_PASSWORD": "not ours",
    }
    settings = load_settings(environ=environ)
    assert settings.admin_pass == "admin" and settings.http_port == 8080
    assert [w for w in settings.warnings if w.startswith("environment:")] == [
        "environment: unknown variable BLYNKOTA_ADMIN_PASSWORD ignored "
        "(did you mean BLYNKOTA_ADMIN_PASS?)",
        "environment: unknown variable BLYNKOTA_CONFIG_FILE ignored "
        "(did you mean BLYNKOTA_CONFIG?)",
        "environment: unknown variable BLYNKOTA_HTTP_PROT ignored "
        "(did you mean BLYNKOTA_HTTP_PORT?)",
        "environment: unknown variable BLYNKOTA_NOTHING_LIKE_IT ignored",
    ]


def test_relative_paths_are_from_the_properties_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    properties = folder / "server.properties"
    properties.write_text(
        "data.folder=fleet\nserver.ssl.cert=tls/c.pem\nserver.ssl.key=tls/k.pem\n"
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: the working directory plays no part
    settings = load_settings(properties_file=properties, environ={})
    assert settings.data_folder == folder / "fleet"
    assert settings.db_url == f"sqlite:///{folder / 'fleet' / 'blynkota.db'}"
    assert (settings.ssl_cert, settings.ssl_key) == (folder / "tls/c.pem", folder / "tls/k.pem")


def test_the_default_data_folder_is_the_checkouts_whatever_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.data_folder == PROJECT_ROOT / "data"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("log.level", "LOUD", "log.level: 'LOUD' is not one of DEBUG, INFO, WARNING"),
        ("log.format", "xml", "log.format: 'xml' is not one of text, json"),
        ("listen.address", "not-an-ip", "listen.address: 'not-an-ip' is not an IP address"),
        ("db.url", "postgres://x", "db.url: 'postgres' is not a supported database"),
        ("db.url", "mysql://root@h/db", "db.url: the 'mysqldb' driver blocks"),
        ("db.url", "nonsense", "db.url: 'nonsense'... is not a database URL"),
        ("allowed.metrics.ips", "everyone", "allowed.metrics.ips: 'everyone' is not a CIDR"),
    ],
)
def test_each_setting_is_checked_by_type(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({key: value}, environ={})


def test_good_values_of_the_checked_keys(tmp_path):
    settings = load_settings(
        {
            "data.folder": tmp_path,
            "log.level": "debug",
            "log.format": "JSON",
            "listen.address": "::1",
            "db.url": "mysql+pymysql://root@127.0.0.1/blynkota",
        },
        environ={},
    )
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.listen_address == "::1"
    assert [str(net) for net in settings.allowed_metrics_networks] == ["127.0.0.1/32", "::1/128"]
