"""tuneloop: data -> LoRA/QLoRA training -> evaluation -> registry -> serving -> monitoring, in one tool."""

__version__ = "0.1.0"
