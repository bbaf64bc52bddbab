from pathlib import Path

from app.settings import Settings, reference_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("OFFRAMP_PORT", "9123")
    monkeypatch.setenv("OFFRAMP_BATCHING", "false")
    monkeypatch.setenv("OFFRAMP_API_KEY", "s3cr3t-value")
    settings = Settings()
    assert settings.port == 9123 and settings.batching is False
    assert settings.api_key.get_secret_value() == "s3cr3t-value" and "s3cr3t" not in repr(settings)


def test_the_settings_reference_in_the_docs_is_current():
    assert reference_table() in DOCS.read_text()


def test_one_shared_thread_pool_is_the_default(monkeypatch):
    monkeypatch.delenv("OFFRAMP_SHARED_THREAD_POOL", raising=False)
    assert Settings().shared_thread_pool is True
