"""MLflow's own authentication, as the registry manages it: the basic-auth app's settings for
the server it launches, and a small client of that app's REST API (users, permissions) that
talks to the server as MLflow's admin.

The server runs ``mlflow server --app-name basic-auth`` with ``MLFLOW_AUTH_CONFIG_PATH``
pointing at an ini file the registry writes (``default_permission = NO_PERMISSIONS``: a user
sees only what they were granted; its own SQLite user database under the registry's MLflow
folder). The admin's password reaches the server through ``MLFLOW_AUTH_ADMIN_PASSWORD`` in its
environment, never through the file. The registry's calls carry the admin's credentials
explicitly (an ``Authorization`` header), not through ``MLFLOW_TRACKING_USERNAME`` in the
process environment, so nothing else in the process acts as the admin by accident.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from plinth_common.errors import Unavailable
from services.registry.healing import MLFLOW

__all__ = ["MlflowAuth", "MlflowAuthClient"]

_CREATE_USER = "/api/2.0/mlflow/users/create"
_GET_USER = "/api/2.0/mlflow/users/get"
_UPDATE_PASSWORD = "/api/2.0/mlflow/users/update-password"
_GRANT = "/api/3.0/mlflow/users/permissions/grant"
_REVOKE = "/api/3.0/mlflow/users/permissions/revoke"
_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
_CREATE_EXPERIMENT = "/api/2.0/mlflow/experiments/create"
_SET_EXPERIMENT_TAG = "/api/2.0/mlflow/experiments/set-experiment-tag"
_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class MlflowAuth:
    """The basic-auth settings of the MLflow server the registry runs.

    Attributes:
        admin_username: MLflow's admin (``settings.common.mlflow_admin_credentials()``).
        admin_password: its password.
        config_path: the ini file written for the server (``MLFLOW_AUTH_CONFIG_PATH``).
        database_uri: the auth app's own user database.
        secret_key: Flask's secret key for the auth app's CSRF protection.
        cache_ttl_s: how long the server remembers a verified password (MLflow checks each
            request's password with PBKDF2 otherwise; the registry's own changes go through
            the one worker, which drops its entry at once).
    """

    admin_username: str
    admin_password: str = field(repr=False)
    config_path: Path
    database_uri: str
    secret_key: str = field(repr=False)
    cache_ttl_s: int = 60

    def config_text(self) -> str:
        """The ini file the server reads: no admin password in it (see :meth:`server_env`)."""
        return (
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {self.database_uri}\n"
            f"admin_username = {self.admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
            f"auth_cache_ttl_seconds = {self.cache_ttl_s}\n"
        )

    def write_config(self) -> None:
        """Writes the ini file (0600) and makes the user database's folder."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        self.config_path.chmod(0o600)
        prefix = "sqlite:///"
        if self.database_uri.startswith(prefix):
            Path(self.database_uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)

    def server_env(self) -> dict[str, str]:
        """What the server's environment needs for the auth app."""
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.config_path),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
        }

    def headers(self) -> dict[str, str]:
        """The admin's credentials for a request to the server (HTTP basic)."""
        return {
            "Authorization": aiohttp.encode_basic_auth(self.admin_username, self.admin_password)
        }


class MlflowAuthClient:
    """Users and permissions of MLflow's basic-auth app, and experiments, as MLflow's admin.

    Args:
        tracking_uri: the MLflow server (``http://127.0.0.1:5000``).
        auth: the admin's credentials.
    """

    def __init__(self, tracking_uri: str, auth: MlflowAuth) -> None:
        self._base = tracking_uri.rstrip("/")
        self._auth = auth

    async def ensure_experiment(self, name: str, tags: Mapping[str, str]) -> tuple[str, bool]:
        """The id of experiment ``name``, made through the server when missing (its artifact
        location is then the server's proxy, ``mlflow-artifacts:/<id>``); ``tags`` are set.
        The flag tells whether it was made now."""
        experiment_id = await self._experiment_id(name)
        if experiment_id is None:
            body = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            status, text = await self._request("POST", _CREATE_EXPERIMENT, json=body)
            if status == 200:
                return str(json.loads(text)["experiment_id"]), True
            experiment_id = await self._experiment_id(name)  # made concurrently
            if experiment_id is None:
                raise Unavailable(
                    f"MLflow did not make experiment {name!r}: {status} {text[:200]}",
                    dependency=MLFLOW,
                    retry_after_s=2.0,
                )
        for key, value in tags.items():
            await self._expect(
                "POST",
                _SET_EXPERIMENT_TAG,
                {"experiment_id": experiment_id, "key": key, "value": value},
            )
        return experiment_id, False

    async def _experiment_id(self, name: str) -> str | None:
        status, text = await self._request(
            "GET", _EXPERIMENT_BY_NAME, params={"experiment_name": name}
        )
        if status == 200:
            return str(json.loads(text)["experiment"]["experiment_id"])
        return None

    async def ensure_user(self, username: str, password: str) -> None:
        """Makes the user, or gives an existing one this password."""
        status, _ = await self._request("GET", _GET_USER, params={"username": username})
        if status == 200:
            await self._expect(
                "PATCH", _UPDATE_PASSWORD, {"username": username, "password": password}
            )
        else:
            await self._expect("POST", _CREATE_USER, {"username": username, "password": password})

    async def grant_manage(self, username: str, resource_type: str, resource_id: str) -> None:
        """Gives ``username`` MANAGE on one experiment (by id) or registered model (by name)."""
        await self._expect(
            "POST",
            _GRANT,
            {
                "username": username,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "permission": "MANAGE",
            },
        )

    async def revoke(self, username: str, resource_type: str, resource_id: str) -> None:
        """Takes ``username``'s own permission on the resource away (none there: nothing)."""
        status, text = await self._request(
            "POST",
            _REVOKE,
            json={"username": username, "resource_type": resource_type, "resource_id": resource_id},
        )
        if status not in (200, 404):
            raise Unavailable(
                f"MLflow's auth API answered {status} to POST {_REVOKE}: {text[:200]}",
                dependency=MLFLOW,
                retry_after_s=2.0,
            )

    async def _expect(self, method: str, path: str, body: dict[str, Any]) -> None:
        status, text = await self._request(method, path, json=body)
        if status != 200:
            # Never the body we sent: it may hold a password.
            raise Unavailable(
                f"MLflow's auth API answered {status} to {method} {path}: {text[:200]}",
                dependency=MLFLOW,
                retry_after_s=2.0,
            )

    async def _request(self, method: str, path: str, **options: Any) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, headers=self._auth.headers()) as session,
                session.request(method, f"{self._base}{path}", **options) as response,
            ):
                return response.status, await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(
                f"MLflow's auth API is unreachable ({type(exc).__name__}); retry shortly",
                dependency=MLFLOW,
                retry_after_s=2.0,
            ) from exc
