"""frcnn-shard: COCO -> WebDataset shards with precomputed RPN anchor targets, and a loader for them."""
__version__ = "0.1.0"


def __getattr__(name):
    # The loader pulls in torch and webdataset; import it only when asked for.
    if name == "make_loader":
        from .loader import make_loader

        return make_loader
    raise AttributeError(name)
