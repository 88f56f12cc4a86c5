"""The platform process (`ballast up`): REST API under /api/v1, admin key bootstrap, the reconciler."""

from ballast.platform.app import create_app
from ballast.platform.server import PlatformOptions, credentials_path, run_platform, save_credentials

__all__ = ["PlatformOptions", "create_app", "credentials_path", "run_platform", "save_credentials"]
