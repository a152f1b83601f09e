"""IP-Adapter: image prompts for text-to-image diffusion models.

    import ipadapter
    pipe = ipadapter.load_pipeline("path/to/sd15")
    ip = ipadapter.load(pipe, "ip-adapter_sd15.safetensors")
    image = ip.generate(images=["cat.png"], seed=0)[0]
"""

from .bases import attach, detach, unet_layers
from .core.adapter import Adapter
from .core.checkpoint import read_checkpoint, write_checkpoint
from .core.config import AdapterConfig
from .core.encoders import ImageEncoder, load_image
from .core.errors import IPAdapterError
from .generation.pipeline import ImagePrompt, IPAdapter, embedded_model, load, load_pipeline

__version__ = "0.1.0"
__all__ = [
    "Adapter", "AdapterConfig", "IPAdapter", "IPAdapterError", "ImageEncoder", "ImagePrompt", "attach", "detach",
    "embedded_model", "load", "load_image", "load_pipeline", "read_checkpoint", "unet_layers", "write_checkpoint",
]
