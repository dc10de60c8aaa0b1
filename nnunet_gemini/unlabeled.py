"""The unlabelled pool: discovery of raw images, preprocessing with the plan's own preprocessor,
and loading with nnU-Net's dataset class.

Sources, in this order: imagesTr (labels ignored), nnUNet_raw/DatasetXXX/imagesUnlabeled/, each
extra --unlabeled_dir, and imagesTs only when asked. Every file must be named like nnU-Net's
imagesTr: CASE_XXXX<file_ending> with one file per channel of dataset.json.

The pool lives in nnUNet_preprocessed/DatasetXXX/<data_identifier>_gemini_unlabeled/, a SIBLING
of the configuration's data folder (an extra file inside <data_identifier>/ would become a
training case of nnU-Net). Each case is saved with nnUNetDatasetBlosc2.save_case; its
"<case>_seg.b2nd" holds the nonzero mask preprocessing returns (0 inside, -1 outside), only
because the dataset class always opens one: it is never a label. The manifest gemini_pool.json
lists the completed cases and is rewritten atomically after each case, so a case counts as done
only once its files are complete; a crash leaves at most files that the next run redoes.
A done case is kept while its source files keep their path (relative to the dataset's raw
folder, so a moved nnUNet_raw is not redone), size and modification time; an image replaced in
place is preprocessed again.
"""
import gzip
import json
import multiprocessing
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_gemini import datasets
from nnunet_gemini.atomic import write_json_atomic
from nnunet_gemini.errors import GeminiUserError, warn_user

POOL_SUFFIX = "_gemini_unlabeled"
MANIFEST_NAME = "gemini_pool.json"
SOURCE_TRAIN, SOURCE_UNLABELED, SOURCE_TEST = "imagesTr", "imagesUnlabeled", "imagesTs"
# Prefixes that make case ids unique when two sources hold the same id.
_SOURCE_PREFIX = {SOURCE_TRAIN: "tr", SOURCE_UNLABELED: "unl", SOURCE_TEST: "ts"}


@dataclass(frozen=True)
class PoolCase:
    case_id: str          # unique in the pool
    source: str           # imagesTr | imagesUnlabeled | imagesTs | unlabeled_dir:<abs path>
    files: Tuple[str, ...]  # one absolute path per channel, channel order


@dataclass
class PoolSummary:
    folder: str
    num_cases: int        # cases in the pool after this call
    processed: List[str]  # case ids preprocessed by this call
    skipped: Dict[str, str]  # case id -> why (WARN)


# ----------------------------------------------------------------------------------------------
# discovery

def _num_channels(dataset_json: dict) -> int:
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    return len(names)


def _train_cases(raw_folder: str, dataset_json: dict, num_channels: int) -> Dict[str, List[str]]:
    if "dataset" in dataset_json:  # nnU-Net's explicit file-list variant of dataset.json
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        entries = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
        return {k: list(v["images"]) for k, v in entries.items()}
    folder = os.path.join(raw_folder, "imagesTr")
    return datasets.scan_case_folder(folder, dataset_json["file_ending"], num_channels) \
        if os.path.isdir(folder) else {}


def discover_pool(dataset_name: str, unlabeled_dirs: Sequence[str] = (),
                  include_test_images: bool = False) -> List[PoolCase]:
    """All unlabelled-pool cases with unique ids (an id seen earlier gets '<source>__' prefixed);
    naming problems are always errors."""
    raw_folder = datasets.raw_dataset_folder(dataset_name)
    dataset_json = datasets.load_json(os.path.join(raw_folder, "dataset.json"))
    file_ending, num_channels = dataset_json["file_ending"], _num_channels(dataset_json)

    sources: List[Tuple[str, str, Dict[str, List[str]]]] = [
        (SOURCE_TRAIN, "tr", _train_cases(raw_folder, dataset_json, num_channels))]
    for name in (SOURCE_UNLABELED,) + ((SOURCE_TEST,) if include_test_images else ()):
        folder = os.path.join(raw_folder, name)
        if os.path.isdir(folder):
            sources.append((name, _SOURCE_PREFIX[name], datasets.scan_case_folder(folder, file_ending, num_channels)))
    for i, d in enumerate(unlabeled_dirs):
        d = os.path.abspath(d)
        if not os.path.isdir(d):
            raise GeminiUserError(f"--unlabeled_dir {d} is not a folder: pass an existing folder "
                                  f"of CASE_XXXX{file_ending} images.")
        sources.append((f"unlabeled_dir:{d}", f"dir{i}", datasets.scan_case_folder(d, file_ending, num_channels)))

    cases: List[PoolCase] = []
    taken = set()
    for source, prefix, found in sources:
        for case in sorted(found):
            case_id = case if case not in taken else f"{prefix}__{case}"
            n = 2
            while case_id in taken:  # the same id in several --unlabeled_dir folders
                case_id, n = f"{prefix}{n}__{case}", n + 1
            taken.add(case_id)
            cases.append(PoolCase(case_id, source, tuple(os.path.abspath(f) for f in found[case])))
    if not cases:
        raise GeminiUserError(
            f"no unlabelled images for {dataset_name}: imagesTr, {raw_folder}/imagesUnlabeled/ "
            f"and the --unlabeled_dir folders hold no CASE_XXXX{file_ending} files. Add images "
            f"to imagesUnlabeled/ or pass --unlabeled_dir DIR.")
    return cases


# ----------------------------------------------------------------------------------------------
# preprocessing

def pool_folder_for(dataset_name: str, plans_identifier: str, configuration: str) -> str:
    plans_file = datasets.require_planned(dataset_name, plans_identifier)
    plans = datasets.load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise GeminiUserError(f"configuration {configuration!r} not in plans {plans_file}: choose "
                              f"one of {', '.join(sorted(plans['configurations']))} with -c.")
    data_identifier = datasets.configuration_data_identifier(plans, configuration)
    return os.path.join(os.path.dirname(plans_file), data_identifier + POOL_SUFFIX)


def _read_manifest(pool_folder: str) -> dict:
    path = os.path.join(pool_folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {"cases": []}
    try:
        return datasets.load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GeminiUserError(f"pool manifest {path} is corrupt ({e}): delete the folder "
                              f"{pool_folder} and preprocess the pool again.") from e


def _write_manifest(pool_folder: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(pool_folder, MANIFEST_NAME), manifest, indent=1)


def _case_files(pool_folder: str, case_id: str) -> List[str]:
    base = os.path.join(pool_folder, case_id)
    return [base + ".b2nd", base + "_seg.b2nd", base + ".pkl"]


class _Worker:
    """Everything one case needs; built once per process (plans parsing is not free)."""

    def __init__(self, plans_file: str, configuration: str, dataset_json_file: str):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        self.plans_manager = PlansManager(plans_file)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.dataset_json = datasets.load_json(dataset_json_file)
        self.reader = self.plans_manager.image_reader_writer_class()
        shape = self.plans_manager.plans["original_median_shape_after_transp"]
        self.dataset_is_3d = min(shape) > 1
        self.preprocessor = self.configuration_manager.preprocessor_class(verbose=False)

    @staticmethod
    def _gzip_complete(path: str) -> str:
        """'' if a .gz file decompresses to its end, else why. ITK's NIfTI reader returns a
        truncated .nii.gz without any error (the missing part becomes garbage), so this is the
        only way to see it; the cost is one decompression per file, once per case."""
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error) as e:
            return f"{path} is unreadable or truncated ({type(e).__name__}: {e})"
        return ""

    def read(self, case: PoolCase) -> Tuple[Optional[np.ndarray], Optional[dict], str]:
        """(data, properties, '') or (None, None, why) for a WARN; GeminiUserError for an ERROR."""
        arrays, props = [], []
        for f in case.files:  # one file at a time so a problem names its file
            why = self._gzip_complete(f) if f.endswith(".gz") else ""
            if why:
                return None, None, why
            try:
                a, p = self.reader.read_images([f])
            except Exception as e:  # SimpleITK/nibabel raise various types for broken files
                return None, None, f"{f} is unreadable or truncated ({type(e).__name__}: " \
                                   f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
            if self.dataset_is_3d and a.shape[1] == 1:
                raise GeminiUserError(f"{f} is a 2D image (shape {a.shape[1:]}) but the dataset is "
                                      f"3D: remove it from the pool or convert it to a 3D volume.")
            if arrays and (a.shape != arrays[0].shape or
                           not np.allclose(p["spacing"], props[0]["spacing"], rtol=1e-4)):
                raise GeminiUserError(
                    f"channels of case '{case.case_id}' differ in geometry: {f} has shape "
                    f"{a.shape[1:]} spacing {tuple(p['spacing'])}, {case.files[0]} has shape "
                    f"{arrays[0].shape[1:]} spacing {tuple(props[0]['spacing'])}. Resample the "
                    f"channels onto one grid.")
            if not np.isfinite(a).all():
                return None, None, f"{f} contains NaN or Inf voxels"
            arrays.append(a)
            props.append(p)
        return np.concatenate(arrays, axis=0), props[0], ""

    def __call__(self, case: PoolCase, pool_folder: str) -> Tuple[PoolCase, str]:
        data, properties, why = self.read(case)
        if data is None:
            return case, why
        # what DefaultPreprocessor.run_case does after reading: transpose, crop, normalise, resample
        data, seg, properties = self.preprocessor.run_case_npy(
            data, None, properties, self.plans_manager, self.configuration_manager, self.dataset_json)
        properties["class_locations"] = {}  # no labels: the data loader must never oversample
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int16, copy=False)  # the nonzero mask, as run_case_save stores segs
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
        patch = tuple(self.configuration_manager.patch_size)
        block, chunk = comp_blosc2_params(data.shape, patch, data.itemsize)
        block_seg, chunk_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        out = os.path.join(pool_folder, case.case_id)
        for f in _case_files(pool_folder, case.case_id):
            if os.path.exists(f):  # blosc2 refuses to overwrite; leftovers of an interrupted run
                os.remove(f)
        nnUNetDatasetBlosc2.save_case(data, seg, properties, out, chunks=chunk, blocks=block,
                                      chunks_seg=chunk_seg, blocks_seg=block_seg)
        return case, ""


_process_worker: Optional[_Worker] = None


def _init_process_worker(plans_file: str, configuration: str, dataset_json_file: str) -> None:
    global _process_worker
    _process_worker = _Worker(plans_file, configuration, dataset_json_file)


def _run_in_process_worker(args) -> Tuple[PoolCase, str]:
    return _process_worker(*args)


def _file_stamps(files: Sequence[str], raw_folder: str) -> List[list]:
    """[path, size, mtime_ns] per source file: what tells a run whether a done case is still the
    same image. The path is relative to the dataset's raw folder (absolute outside it, e.g.
    --unlabeled_dir), so moving nnUNet_raw (mv, rsync -a, cp -p keep mtimes) redoes nothing."""
    stamps = []
    for f in files:
        rel = os.path.relpath(f, raw_folder)
        st = os.stat(f)
        stamps.append([f if rel.startswith(os.pardir) else rel, st.st_size, st.st_mtime_ns])
    return stamps


def _unchanged(entry: dict, case: PoolCase, stamps: List[list]) -> bool:
    if entry["source"] != case.source:
        return False
    if "stamps" in entry:
        return entry["stamps"] == stamps
    return tuple(entry["files"]) == case.files  # a manifest written before stamps existed


def preprocess_pool(dataset_name: str, plans_identifier: str = "nnUNetPlans",
                    configuration: str = "3d_fullres", num_processes: int = 1,
                    unlabeled_dirs: Sequence[str] = (), include_test_images: bool = False,
                    strict: bool = False) -> PoolSummary:
    """Preprocess the cases of the pool that are not done yet; returns a summary whose .folder
    is the pool folder. Unreadable/truncated or non-finite images are skipped with a warning
    (GeminiUserError with strict=True)."""
    pool_folder = pool_folder_for(dataset_name, plans_identifier, configuration)
    plans_file = datasets.require_planned(dataset_name, plans_identifier)
    dataset_json_file = os.path.join(os.path.dirname(plans_file), "dataset.json")
    if not os.path.isfile(dataset_json_file):  # nnU-Net copies it there during planning
        dataset_json_file = os.path.join(datasets.raw_dataset_folder(dataset_name), "dataset.json")
    cases = discover_pool(dataset_name, unlabeled_dirs, include_test_images)
    os.makedirs(pool_folder, exist_ok=True)

    manifest = _read_manifest(pool_folder)
    if manifest.get("cases") and (manifest.get("plans"), manifest.get("configuration")) != \
            (plans_identifier, configuration):
        raise GeminiUserError(f"pool {pool_folder} was built for plans {manifest.get('plans')!r} "
                              f"/ {manifest.get('configuration')!r}: delete the folder to rebuild it.")
    done = {c["case_id"]: c for c in manifest.get("cases", [])
            if all(os.path.isfile(f) for f in _case_files(pool_folder, c["case_id"]))}
    wanted = {c.case_id: c for c in cases}
    raw_folder = datasets.raw_dataset_folder(dataset_name)
    stamps = {c.case_id: _file_stamps(c.files, raw_folder) for c in cases}
    todo = [c for c in cases if c.case_id not in done or not _unchanged(done[c.case_id], c, stamps[c.case_id])]
    # cases whose source files vanished leave the pool (their files go too); kept ones record
    # where their sources are now
    entries = {k: {**v, "files": list(wanted[k].files), "stamps": stamps[k]}
               for k, v in done.items() if k in wanted and wanted[k] not in todo}
    for stale in set(done) - set(entries):
        if stale not in wanted:
            for f in _case_files(pool_folder, stale):
                if os.path.exists(f):
                    os.remove(f)

    def record():
        _write_manifest(pool_folder, {"plans": plans_identifier, "configuration": configuration,
                                      "dataset": dataset_name,
                                      "cases": [entries[k] for k in sorted(entries)]})

    record()
    processed, skipped = [], {}

    def handle(case: PoolCase, why: str):
        if why:
            if strict:
                raise GeminiUserError(f"{why}: fix or remove it (pool case '{case.case_id}'), or "
                                      f"drop --strict to skip such cases with a warning.")
            warn_user(f"{why}; skipping pool case '{case.case_id}'.")
            skipped[case.case_id] = why
        else:
            entries[case.case_id] = {**asdict(case), "files": list(case.files), "stamps": stamps[case.case_id]}
            processed.append(case.case_id)
            record()  # the manifest entry is written last: only complete cases count as done

    if todo and num_processes <= 1:
        worker = _Worker(plans_file, configuration, dataset_json_file)
        for c in todo:
            handle(*worker(c, pool_folder))
    elif todo:
        ctx = multiprocessing.get_context("spawn")  # no forked torch/blosc2 thread state
        with ctx.Pool(min(num_processes, len(todo)), initializer=_init_process_worker,
                      initargs=(plans_file, configuration, dataset_json_file)) as pool:
            for result in pool.imap_unordered(_run_in_process_worker,
                                              [(c, pool_folder) for c in todo]):
                handle(*result)
    if skipped:
        warn_user(f"{len(skipped)} of {len(cases)} pool case(s) skipped: "
                  f"{', '.join(sorted(skipped))}.")
    if not entries:
        raise GeminiUserError(f"no usable unlabelled images for {dataset_name}: all "
                              f"{len(cases)} case(s) were skipped (see the warnings above).")
    return PoolSummary(pool_folder, len(entries), processed, skipped)


# ----------------------------------------------------------------------------------------------
# loading

def pool_case_ids(pool_folder: str, exclude: Sequence[str] = ()) -> List[str]:
    """Completed case ids of a pool (from its manifest), minus `exclude`."""
    if not os.path.isfile(os.path.join(pool_folder, MANIFEST_NAME)):
        raise GeminiUserError(f"{pool_folder} holds no preprocessed unlabelled pool: run "
                              f"gemini_pretrain -d ID --preprocess_only first.")
    excluded = set(exclude)
    return sorted(c["case_id"] for c in _read_manifest(pool_folder)["cases"]
                  if c["case_id"] not in excluded)


def load_pool_dataset(pool_folder: str, case_ids: Sequence[str]):
    """nnU-Net's dataset class over the given pool cases (the class save_case wrote with; the
    folder also holds the manifest, so infer_dataset_class cannot be used on it)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    return nnUNetDatasetBlosc2(pool_folder, list(case_ids))
