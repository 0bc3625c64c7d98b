"""Settings: properties files as Blynk writes them, environment, overrides."""

import pytest

from blynkota.config import ConfigError, load_settings, parse_properties


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
