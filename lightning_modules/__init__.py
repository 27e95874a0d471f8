"""LightningModules, one file per method. Importing this package registers every method."""

from lightning_modules.registry import METHODS, MethodSpec, list_methods, register_method

__all__ = ["METHODS", "MethodSpec", "list_methods", "register_method"]
import lightning_modules.cam_baseline  # noqa: F401,E402
import lightning_modules.nonlocal_unet  # noqa: F401,E402
import lightning_modules.magsd  # noqa: F401,E402
import lightning_modules.pcam  # noqa: F401,E402
import lightning_modules.dcmt  # noqa: F401,E402
import lightning_modules.dcmt_subject  # noqa: F401,E402
import lightning_modules.retinanet  # noqa: F401,E402
import lightning_modules.oxnet  # noqa: F401,E402
