"""torch.hub entry points: `torch.hub.load("OWNER/saliency-unet", "saliency_unet", repo_id="me/saliency-unet")`.

torch.hub downloads this repository and puts it first on sys.path, so `hub` below is this
repository's package; the weights come from the Hugging Face Hub (or a local folder) through
`SaliencyUNet.from_pretrained`, which never downloads ImageNet weights.
"""

dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors", "numpy", "PIL", "cv2", "skimage"]


def saliency_unet(repo_id=None, revision=None, pretrained=True, **config):
    """The saliency U-Net: a Hub model repo id (or a local folder) -> SaliencyUNet in eval mode.

    repo_id: e.g. "me/saliency-unet", or a folder written by save_pretrained / `python -m train`.
    revision: Hub branch, tag or commit. pretrained=False builds a random-init model from
    SaliencyConfig fields passed as keywords (no download at all).
    The model maps images to fixation density maps: `model.predict("photo.jpg")`.
    """
    import hub

    if not hasattr(hub, "SaliencyUNet"):
        raise ImportError(
            f"another package named `hub` is already imported (from {getattr(hub, '__file__', '?')}); "
            "it is PyPI's unrelated `hub` package: `pip uninstall hub` and restart Python."
        )
    if not pretrained:
        return hub.SaliencyUNet(hub.SaliencyConfig(**config), backbone_weights=None).eval()
    if repo_id is None:
        raise ValueError(
            'saliency_unet needs repo_id, the Hub model repo (e.g. repo_id="me/saliency-unet") or a local folder; '
            "pretrained=False builds a random-init model instead."
        )
    if config:
        raise TypeError(f"config fields {sorted(config)} only apply with pretrained=False; the repo's config.json sets them.")
    return hub.SaliencyUNet.from_pretrained(repo_id, revision=revision)
