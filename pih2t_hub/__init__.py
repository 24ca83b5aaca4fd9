"""pih2t_hub: long-tailed recognition on pretrained timm / Hugging Face backbones."""
__version__ = "0.1.0"
