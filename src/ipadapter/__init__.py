"""IP-Adapter: image prompts for text-to-image diffusion models.

    import ipadapter
    pipe = ipadapter.load_pipeline("path/to/sd15")
    ip = ipadapter.load(pipe, "ip-adapter_sd15.safetensors")
    image = ip.generate(images=["cat.png"], seed=0)[0]
"""

from .adapter import Adapter, attach, detach, unet_layers
from .checkpoint import read_checkpoint, write_checkpoint
from .config import AdapterConfig
from .encoders import ImageEncoder, load_image
from .errors import IPAdapterError
from .pipeline import ImagePrompt, IPAdapter, embedded_model, load, load_pipeline

__version__ = "0.1.0"
__all__ = [
    "Adapter", "AdapterConfig", "IPAdapter", "IPAdapterError", "ImageEncoder", "ImagePrompt", "attach", "detach",
    "embedded_model", "load", "load_image", "load_pipeline", "read_checkpoint", "unet_layers", "write_checkpoint",
]
