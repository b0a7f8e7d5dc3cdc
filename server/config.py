"""Service settings: one pydantic-settings class, environment prefix ``SNNET_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


class Settings(BaseSettings):
    """Every setting of the service; each is read from ``SNNET_<NAME>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="SNNET_", extra="forbid")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    weights: Path = Field(BUNDLED_WEIGHTS, description="checkpoint directory to serve")


@lru_cache
def get_settings() -> Settings:
    return Settings()
