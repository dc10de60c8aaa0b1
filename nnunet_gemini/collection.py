"""A labelled collection as the datasets of a label-efficiency study (`gemini_benchmark --collection`).

A collection is a folder of labelled scans in one of two forms:
- `images/CASE<ending>` + `labels/CASE<ending>` (one channel, the same file name in both; an
  optional dataset.json gives channel and label names), or
- an nnU-Net raw dataset (dataset.json, `imagesTr/CASE_XXXX<ending>`, `labelsTr/CASE<ending>`);
  only its labelled imagesTr cases are drawn: its imagesTs and imagesUnlabeled are not used.

One seed draws, from the sorted case ids, the test set, the unlabelled pool, the selection set
(for choosing options, never the test set) and the N labelled cases of each draw: all disjoint,
leftovers unused. Each (N, draw) becomes the nnU-Net raw dataset a user with N labelled scans
would have: imagesTr/labelsTr = the N cases, imagesUnlabeled = the pool, imagesTs/labelsTs = the
test set, imagesSelection/labelsSelection = the selection set (nnU-Net ignores both extra folders).
Every problem is found before anything trains (GeminiUserError naming the file and the fix).
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.fewshot_split import fewshot_folds

FOLDERS_FORM, NNUNET_FORM = "images+labels", "nnU-Net raw dataset"
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".png")
SELECTION_IMAGES, SELECTION_LABELS = "imagesSelection", "labelsSelection"
# geometry tolerances of image vs label (relative spacing, origin in voxels, direction cosines)
_SPACING_RTOL, _ORIGIN_VOXELS, _DIRECTION_ATOL = 1e-4, 1e-2, 1e-4


@dataclass(frozen=True)
class Collection:
    root: str
    form: str
    file_ending: str
    channel_names: Dict[str, str]
    labels: Dict[str, int]                  # name -> value, background included
    images: Dict[str, Tuple[str, ...]]      # case id -> channel files (channel order)
    label_files: Dict[str, str] = field(repr=False)

    @property
    def case_ids(self) -> List[str]:
        return sorted(self.images)


def _ending_of(name: str) -> Optional[str]:
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def _listing(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def _folders_form(root: str, dataset_json: Optional[dict], channel_name: str):
    images_dir, labels_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    names = _listing(images_dir)
    endings = {_ending_of(n) for n in names}
    if not names:
        raise GeminiUserError(f"{images_dir} holds no images: put one CASE<ending> image per labelled case there.")
    if None in endings or len(endings) > 1:
        odd = next(n for n in names if _ending_of(n) is None) if None in endings else sorted(endings)
        raise GeminiUserError(f"{images_dir}: all images need one file ending of {IMAGE_ENDINGS}, found {odd}: "
                              f"convert them to one format (or move other files out).")
    ending = endings.pop()
    if dataset_json and dataset_json.get("file_ending", ending) != ending:
        raise GeminiUserError(f"{os.path.join(root, 'dataset.json')} says file_ending "
                              f"{dataset_json['file_ending']!r} but the images end in {ending!r}: fix one of them.")
    label_names = _listing(labels_dir) if os.path.isdir(labels_dir) else []
    cases = {n[:-len(ending)] for n in names}
    labelled = {n[:-len(ending)] for n in label_names if n.endswith(ending)}
    for n in label_names:
        if not n.endswith(ending):
            raise GeminiUserError(f"{os.path.join(labels_dir, n)} does not end in {ending!r} like the images: "
                                  f"give every label the file name of its image.")
    if cases - labelled:
        case = sorted(cases - labelled)[0]
        raise GeminiUserError(f"{os.path.join(images_dir, case + ending)} has no label "
                              f"{os.path.join(labels_dir, case + ending)}: add it or move the image out "
                              f"({len(cases - labelled)} image(s) without a label).")
    if labelled - cases:
        case = sorted(labelled - cases)[0]
        raise GeminiUserError(f"{os.path.join(labels_dir, case + ending)} has no image "
                              f"{os.path.join(images_dir, case + ending)}: add it or move the label out.")
    channels = (dataset_json or {}).get("channel_names") or {"0": channel_name}
    if len(channels) != 1:
        raise GeminiUserError(f"{root}: the images/ + labels/ form holds one channel per case, but dataset.json "
                              f"names {len(channels)}: use an nnU-Net raw dataset (imagesTr/CASE_XXXX) instead.")
    images = {c: (os.path.join(images_dir, c + ending),) for c in cases}
    labels = {c: os.path.join(labels_dir, c + ending) for c in cases}
    return ending, dict(channels), images, labels


def _nnunet_form(root: str, dataset_json: dict):
    from nnunet_gemini.datasets import list_labelled_cases, scan_case_folder
    from nnunet_gemini.unlabeled import _num_channels
    ending = dataset_json["file_ending"]
    scanned = scan_case_folder(os.path.join(root, "imagesTr"), ending, _num_channels(dataset_json))
    labelled = set(list_labelled_cases(root))
    missing = sorted(set(scanned) - labelled)
    if missing:
        raise GeminiUserError(f"{os.path.join(root, 'imagesTr')}: case {missing[0]!r} has no label "
                              f"{os.path.join(root, 'labelsTr', missing[0] + ending)}: add it or move its images out.")
    images = {c: tuple(files) for c, files in scanned.items()}
    labels = {c: os.path.join(root, "labelsTr", c + ending) for c in scanned}
    return ending, dict(dataset_json["channel_names"]), images, labels


def read_collection(root: str, channel_name: str = "MRI") -> Collection:
    """The collection's cases and names (no image is read here; see check_collection)."""
    from nnunet_gemini.datasets import load_json
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise GeminiUserError(f"--collection {root} is not a folder: pass a folder with images/ + labels/ "
                              f"or an nnU-Net raw dataset.")
    json_file = os.path.join(root, "dataset.json")
    dataset_json = load_json(json_file) if os.path.isfile(json_file) else None
    if os.path.isdir(os.path.join(root, "images")):
        form, (ending, channels, images, labels) = FOLDERS_FORM, _folders_form(root, dataset_json, channel_name)
    elif dataset_json is not None and os.path.isdir(os.path.join(root, "imagesTr")):
        form, (ending, channels, images, labels) = NNUNET_FORM, _nnunet_form(root, dataset_json)
    else:
        raise GeminiUserError(f"--collection {root} holds neither images/ + labels/ nor an nnU-Net raw dataset "
                              f"(dataset.json + imagesTr/ + labelsTr/): arrange the labelled scans in one of the two.")
    names = {str(k): int(v) for k, v in dataset_json["labels"].items()} if dataset_json and "labels" in \
        dataset_json else None
    return Collection(root, form, ending, channels, names or {}, images, labels)


def _geometry(path: str):
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise GeminiUserError(f"{path} is unreadable ({str(e).strip().splitlines()[-1][:200]}): replace or remove "
                              f"the file (and its image/label partner).") from None
    return (reader.GetSize(), np.array(reader.GetSpacing()), np.array(reader.GetOrigin()),
            np.array(reader.GetDirection()))


def _same_geometry(a, b) -> bool:
    return (a[0] == b[0] and np.allclose(a[1], b[1], rtol=_SPACING_RTOL, atol=0)
            and np.all(np.abs(a[2] - b[2]) <= _ORIGIN_VOXELS * a[1]) and np.allclose(a[3], b[3], atol=_DIRECTION_ATOL))


def _label_values(path: str) -> np.ndarray:
    import SimpleITK as sitk
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(path))  # a view would outlive its image
    except RuntimeError as e:
        raise GeminiUserError(f"{path} is unreadable ({str(e).strip().splitlines()[-1][:200]}): replace or remove "
                              f"the label and its image.") from None
    values = np.unique(array)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)) or values.min() < 0:
        raise GeminiUserError(f"{path} holds label values {values[:8].tolist()}, not non-negative integers: "
                              f"labels must be integer maps (0 = background).")
    return values.astype(int)


def check_collection(coll: Collection, case_ids: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Reads every header and label of `case_ids` (all cases by default): readable, the channels
    and the label on one grid, label values integers within dataset.json's labels. Returns the
    labels {name: value} (dataset.json's, else background + label_<value> of the values found)."""
    found = set()
    for case in case_ids if case_ids is not None else coll.case_ids:
        label = coll.label_files[case]
        ref = _geometry(label)
        for image in coll.images[case]:
            geo = _geometry(image)
            if not _same_geometry(geo, ref):
                raise GeminiUserError(
                    f"{image} and its label {label} differ in geometry (image size {geo[0]}, spacing "
                    f"{np.round(geo[1], 4).tolist()}, origin {np.round(geo[2], 3).tolist()}; label size {ref[0]}, "
                    f"spacing {np.round(ref[1], 4).tolist()}, origin {np.round(ref[2], 3).tolist()}): resample the "
                    f"label onto the image grid or remove the case.")
        values = set(_label_values(label).tolist())
        if coll.labels and not values <= set(coll.labels.values()):
            raise GeminiUserError(f"{label} holds label value(s) {sorted(values - set(coll.labels.values()))} that "
                                  f"{os.path.join(coll.root, 'dataset.json')} does not define "
                                  f"({coll.labels}): add them to its labels or fix the label file.")
        found |= values
    if coll.labels:
        return dict(coll.labels)
    return {"background": 0, **{f"label_{v}": v for v in sorted(found - {0})}}


def file_manifest(coll: Collection) -> List[dict]:
    """[{file (relative to the collection), sha256}] of every image and label, sorted."""
    entries = []
    for case in coll.case_ids:
        for path in (*coll.images[case], coll.label_files[case]):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entries.append({"file": os.path.relpath(path, coll.root), "sha256": digest.hexdigest()})
    return sorted(entries, key=lambda e: e["file"])


def json_digest(obj) -> str:
    """sha256 of a JSON-able object, key order aside (the file manifest, a plans signature)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def draw_split(case_ids: Sequence[str], test: int, pool: int, selection: int, ns: Sequence[int], draws: int,
               seed: int) -> dict:
    """{test, pool, selection, labelled_candidates, draws: [{n, draw, train}]} from one seed: a
    permutation of the sorted ids gives test, pool and selection in that order; the N labelled
    cases of each (N, draw) come from the rest (gemini_fewshot_split's rule, so adding an N or a
    draw leaves the others as they were). All disjoint; what no draw takes stays unused."""
    cases = sorted(case_ids)
    if min(test, selection) < 1 or pool < 2:
        raise GeminiUserError(f"--test_cases {test}, --selection_cases {selection} and --pool_cases {pool}: need at "
                              f"least 1 test case, 1 selection case and 2 pool cases (GEMINI pairs two subjects).")
    need = test + pool + selection + max(ns)
    if len(cases) < need:
        raise GeminiUserError(f"the collection holds {len(cases)} labelled cases, fewer than --test_cases {test} + "
                              f"--pool_cases {pool} + --selection_cases {selection} + the largest --n {max(ns)} = "
                              f"{need}: lower these numbers or add cases.")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    parts = {"test": order[:test], "pool": order[test:test + pool],
             "selection": order[test + pool:test + pool + selection]}
    rest = order[test + pool + selection:]
    split = {k: sorted(v) for k, v in parts.items()}
    split["labelled_candidates"] = sorted(rest)
    split["draws"] = [{"n": f["n"], "draw": f["draw"], "train": f["train"]}
                      for f in fewshot_folds(rest, ns, draws, seed=seed, min_val=0)]
    return split


def _place(src: str, dst: str) -> None:
    """A hard link when possible (no copy of large scans), else a copy."""
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_dataset(coll: Collection, labels: Dict[str, int], split: dict, train: Sequence[str], raw_root: str,
                  dataset_id: int, name: str) -> str:
    """The raw dataset of one (N, draw) under raw_root (rebuilt from scratch); returns its folder."""
    from nnunet_gemini.datasets import dataset_prefix
    folder = os.path.join(raw_root, f"{dataset_prefix(dataset_id)}{name}")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    ending = coll.file_ending
    parts = [("imagesTr", "labelsTr", train), ("imagesUnlabeled", None, split["pool"]),
             ("imagesTs", "labelsTs", split["test"]), (SELECTION_IMAGES, SELECTION_LABELS, split["selection"])]
    for images_dir, labels_dir, cases in parts:
        os.makedirs(os.path.join(folder, images_dir))
        if labels_dir:
            os.makedirs(os.path.join(folder, labels_dir))
        for case in cases:
            for channel, src in enumerate(coll.images[case]):
                _place(src, os.path.join(folder, images_dir, f"{case}_{channel:04d}{ending}"))
            if labels_dir:
                _place(coll.label_files[case], os.path.join(folder, labels_dir, case + ending))
    dataset_json = {"channel_names": coll.channel_names, "labels": labels, "numTraining": len(train),
                    "file_ending": ending, "name": name,
                    "description": f"gemini_benchmark collection study: {len(train)} labelled case(s) of {coll.root}"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def plans_signature(plans: dict, configuration: str) -> dict:
    """What must agree for one pre-training to serve several datasets: the network (class and
    arguments), input channels (normalisation schemes, one per channel) and spacing."""
    config = plans["configurations"][configuration]
    arch = config.get("architecture", {})
    return {"network_class_name": arch.get("network_class_name"), "arch_kwargs": arch.get("arch_kwargs"),
            "normalization_schemes": config.get("normalization_schemes"),
            "spacing": [round(float(s), 6) for s in config.get("spacing", [])]}
