"""The model card (`README.md`) written next to the weights.

`build_card` is called by `SaliencyUNet.save_pretrained` with whatever the caller knows:
training data and config (from `python -m train`), and evaluation results in the JSON format of
`python -m train.evaluate`, which become the card's `model-index`.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hub.config import SaliencyConfig

REPO_PLACEHOLDER = "YOUR_NAMESPACE/saliency-unet"
# Where the code lives: the card's install line and torch.hub line point here. Equal to
# pyproject.toml's [project.urls] Source (tests/test_packaging.py checks it).
SOURCE_URL = "https://github.com/YOUR_GITHUB_NAMESPACE/saliency-unet"
DOCS_URL = SOURCE_URL + "#use-the-model-from-code"
DISTRIBUTION = "saliency-unet"  # the pip name; the import name is `hub`
METRIC_NAMES = {
    "cc": "CC",
    "kld": "KLD",
    "nss": "NSS",
    "sim": "SIM",
    "auc_judd": "AUC-Judd",
    "auc_borji": "AUC-Borji",
    "sauc": "sAUC",
    "info_gain": "IG",
}
# Rows of the baselines `python -m train.evaluate` scores on the same images.
BASELINE_NAMES = {
    "center": "centre prior (a Gaussian at the image centre)",
    "mean": "mean ground-truth map of the training images",
}
CITATIONS = {
    "salicon": """@inproceedings{jiang2015salicon,
  title={SALICON: Saliency in Context},
  author={Jiang, Ming and Huang, Shengsheng and Duan, Juanyong and Zhao, Qi},
  booktitle={CVPR}, year={2015}}""",
    "nus_scene": """@article{liang2017scene,
  title={Saliency Prediction with Scene Structural Guidance},
  author={Liang, Haoran and Jiang, Ming and Liang, Ronghua and Zhao, Qi},
  journal={Journal of Visual Communication and Image Representation}, year={2017}}""",
    "metrics": """@article{bylinskii2019metrics,
  title={What do different evaluation metrics tell us about saliency models?},
  author={Bylinskii, Zoya and Judd, Tilke and Oliva, Aude and Torralba, Antonio and Durand, Fr{\\'e}do},
  journal={IEEE TPAMI}, year={2019}}""",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Predicts where people look in a photo: a fixation density map at the image's own resolution,
from a U-Net with a {{ config.backbone }} encoder fine-tuned on human eye-tracking data.

## Usage

The code is at {{ source_url }}. It installs as the distribution `{{ distribution }}`, whose Python
package is named `hub`, with only what inference needs (torch, torchvision, huggingface_hub,
safetensors, numpy, pillow, opencv-python-headless, tqdm, scikit-image):

```bash
pip install "{{ distribution }} @ git+{{ source_url }}"
```

Do not `pip install hub`: that is an unrelated PyPI package (Activeloop's old Deep Lake client)
with the same import name, and the two cannot live in the same environment (`pip uninstall hub`
first if you have it).

```python
from PIL import Image
from hub import SaliencyUNet
from hub.preprocess import overlay

model = SaliencyUNet.from_pretrained("{{ repo_id }}")   # add .to("cuda") for a GPU
saliency = model.predict("photo.jpg")   # float32 H x W in [0, 1], peak 1, original resolution
Image.fromarray(overlay("photo.jpg", saliency, colormap="jet", alpha=0.6)).save("overlay.png")
```

A whole folder (16-bit PNG maps, overlays, and a `summary.csv` with each image's peak and the
share of attention in its top 10 % of pixels; `torchrun --nproc_per_node N -m hub predict ...`
splits the images across GPUs), or through torch.hub:

```bash
python -m hub predict photos/ --recursive --model {{ repo_id }} --out maps/ --overlay
```

```python
import torch
model = torch.hub.load("{{ github_repo }}", "saliency_unet", repo_id="{{ repo_id }}")
```

{% if example -%}
![This model's fixation density map over {{ example_source }}]({{ example }})

*This model's map of {{ example_source }}, drawn over the photo (`{{ example }}` in this repo).*

{% endif -%}
`predict` takes a path, a `PIL.Image` or an H x W x 3 uint8 RGB array (grey, RGBA, palette,
16-bit and CMYK images are converted; EXIF orientation is applied), or a list of them (batched).
{% if config.keep_aspect -%}
It keeps each image's aspect: the longer side is resized to {{ config.input_size | max }} pixels, the shorter one to
the nearest multiple of 32; the map is resized back.
{%- else -%}
It runs at {{ config.input_size[0] }} x {{ config.input_size[1] }} pixels and resizes the map back.
{%- endif %}
{% if config.flip_tta %}The map is the mean of the image's and its mirror image's maps (test-time flip averaging). {% endif %}
{%- if config.face_prior %}{% if config.face_detector == 'mtcnn' %}Faces found in the photo by MTCNN (a small CNN face detector trained on WIDER FACE, shipped with the package: `hub.mtcnn`){% elif config.face_detector == 'frontal+profile' %}Frontal and profile faces found in the photo by classic detectors (OpenCV's LBP frontal-face and Haar profile-face cascades, `hub.faces`){% else %}Frontal faces found in the photo by a classic detector (OpenCV's LBP frontal-face cascade, `hub.faces`){% endif %} raise the map where they are: it is multiplied by (1 + {{ config.face_prior }} x a Gaussian on each face). {% endif %}
{%- if config.blur %}A Gaussian blur of sigma {{ config.blur }} x the map's longer side, calibrated on validation data, is applied to the output. {% endif %}
ImageNet mean/std normalisation happens inside the model, so a raw forward pass takes RGB in [0, 1].
It runs in bf16 or fp16 where the hardware does natively; on other CPUs with int8 dot products
(VNNI) it runs the int8 `model.int8.onnx` when this repo holds one made from these weights
(`python -m hub export-int8`, needs `pip install onnxruntime` to run), else fp32.

## Architecture

- Encoder: torchvision {{ config.backbone }} (stem, layer1..layer4; no pooling or classifier).
- Decoder: 1x1 bottleneck to {{ config.decoder_channels[0] }} channels, then four stages of transposed
  convolution (k=4, s=2) + skip concatenation + 1x1 fusion ({{ config.decoder_channels[:4] | join(", ") }}
  channels), a last transposed convolution to {{ config.decoder_channels[4] }} channels at full
  resolution, a 3x3 convolution and a sigmoid. Every conv is followed by BatchNorm and ReLU.
{%- if config.center_prior %}
- Centre bias: {{ config.center_prior }} learned Gaussian maps of the image frame (learned centres and widths)
  are concatenated to the last skip fusion, so the content pathway need not learn "the middle".
{%- endif %}
- {{ "{:,}".format(num_parameters) }} parameters; any input size works (padded to a multiple of 32 and cropped back).

## Training
{% if command %}
The command that trained these weights:

```bash
{{ command }}
```
{% endif %}
{% if training %}
{% if training.data %}- Data: {{ training.data }}{% endif %}
{% for key, value in training.items() if key != "data" %}
- `{{ key }}`: `{{ value }}`
{%- endfor %}
{% else %}
No training information was recorded with these weights.
{% endif %}

## Evaluation
{% if evaluation %}
On {{ evaluation.dataset.name }}{% if evaluation.dataset.split %} ({{ evaluation.dataset.split }} split){% endif %},
{{ evaluation.n_images }} images, metrics as defined by the MIT saliency benchmark (KLD: lower is
better; all others: higher is better). Baselines are computed on the same images in the same run.

| model | {% for m in metric_keys %}{{ metric_names[m] }} | {% endfor %}
|---|{% for m in metric_keys %}---|{% endfor %}
| **this model** | {% for m in metric_keys %}{{ "%.4f" | format(evaluation.metrics[m]) }} | {% endfor %}
{% for name, scores in (evaluation.baselines or {}).items() %}| {{ baseline_names.get(name, name + " baseline") }} | {% for m in metric_keys %}{{ "%.4f" | format(scores[m]) if m in scores else "" }} | {% endfor %}
{% endfor %}
{% else %}
No evaluation results were recorded with these weights.
{% endif %}

## Limitations

- **Centre bias.** Eye-tracking data has a strong central tendency (observers start at the
  screen centre, photographers centre subjects), and the model learns it: a plain Gaussian
  at the centre already scores well on CC and AUC-Judd. Compare with sAUC, which discounts it.
- **Dataset bias.** Free-viewing of natural photos by small groups of adults in a lab (or by
  mouse-contingent crowd data for SALICON). Maps for web pages, charts, video frames, medical
  images or task-driven viewing may be wrong.
{%- if training and training.backbone_init in ("none", None) %}
- **No ImageNet pretraining.** This model's encoder started from random weights, so it has
  seen only its eye-tracking images: it knows little of objects, faces and text, and its maps
  lean more on layout, contrast and the centre than a pretrained encoder's would. In crowds,
  for example, the heat lies on the band of heads rather than on the single faces observers fixate.
{%- endif %}
- **Free viewing of photos only.** No task, no video (no motion, no temporal context), no
  sequences of fixations: a map says where gaze lands, not in what order.
- Maps are relative: `predict` scales each to a peak of 1, so values are comparable within an
  image, not across images.

## Citation
{% for key in citations %}
```bibtex
{{ citation_text[key] }}
```
{% endfor %}
"""


def _eval_results(evaluation: dict[str, Any]) -> list[EvalResult]:
    dataset = evaluation.get("dataset", {})
    return [
        EvalResult(
            task_type="saliency-prediction",
            task_name="Saliency prediction",
            dataset_type=str(dataset.get("type") or dataset.get("name", "custom")),
            dataset_name=str(dataset.get("name", "custom")),
            dataset_split=dataset.get("split"),
            metric_type=key,
            metric_name=METRIC_NAMES.get(key, key),
            metric_value=round(float(value), 4),
        )
        for key, value in evaluation.get("metrics", {}).items()
        if key in METRIC_NAMES and value == value  # skip NaN (metric not computable)
    ]


def build_card(
    config: SaliencyConfig,
    *,
    num_parameters: int,
    repo_id: str | None = None,
    training: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
    title: str = "Saliency U-Net",
    command: str | None = None,
    example: str | None = None,
    example_source: str | None = None,
    repo_url: str | None = None,
    **_: Any,
) -> ModelCard:
    """Render the model card.

    training: free-form facts about the run; key "data" is shown as prose, the rest as a list.
    evaluation: the JSON of `python -m train.evaluate`: {"dataset": {"name", "split"},
        "n_images", "metrics": {name: value}, "baselines": {name: {metric: value}}}.
    datasets: dataset keys for citations and metadata ("salicon", "nus_scene", ...).
    command: the exact command line that trained the weights (also read from training["command"]).
    example: file name, in the model folder, of an example overlay picture (written by
        `hub.publish.export`); example_source says what the photo is.
    repo_url: where the code lives (default `SOURCE_URL`); the install line points there.
    """
    training = dict(training) if training else None
    if training and command is None:
        command = training.pop("command", None)
    source_url = (repo_url or SOURCE_URL).rstrip("/")
    datasets = list(datasets or [])
    if evaluation and evaluation.get("dataset", {}).get("name") in CITATIONS:
        datasets.append(evaluation["dataset"]["name"])
    datasets = sorted(set(datasets))
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="pytorch",
        pipeline_tag="image-to-image",
        tags=sorted({"saliency-prediction", "visual-saliency", "eye-tracking", "fixation-prediction",
                     "pytorch_model_hub_mixin", "model_hub_mixin", config.backbone}),
        datasets=datasets or None,
        metrics=["cc", "kld", "nss", "sim", "auc"] if evaluation else None,
        model_name=title,
        eval_results=_eval_results(evaluation) if evaluation else None,
    )
    metric_keys = [k for k in METRIC_NAMES if evaluation and k in evaluation.get("metrics", {})]
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=title,
        config=config,
        num_parameters=num_parameters,
        repo_id=repo_id or REPO_PLACEHOLDER,
        training=training,
        evaluation=evaluation,
        metric_keys=metric_keys,
        metric_names=METRIC_NAMES,
        citations=[k for k in datasets if k in CITATIONS] + ["metrics"],
        citation_text=CITATIONS,
        baseline_names=BASELINE_NAMES,
        command=command,
        example=example,
        example_source=example_source or example,
        source_url=source_url,
        distribution=DISTRIBUTION,
        github_repo="/".join(source_url.split("/")[-2:]),
    )
