"""nnU-Net folders and datasets as every CLI of ours needs them, with errors that say the fix.

Environment variables are read when a function is called (never at import), so tests and
wrappers can point nnUNet_raw / nnUNet_preprocessed / nnUNet_results anywhere per call.
Nothing heavy is imported here: the plans are read as plain JSON.
"""
import json
import os
import re
from typing import Dict, List, Optional

from nnunet_gemini.errors import GeminiUserError

ENV_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
SETUP_DOC = "see nnU-Net's documentation/set_environment_variables.md"


def require_env_folder(var: str, must_exist: bool = True) -> str:
    """Value of the nnU-Net folder variable `var`; the folder must exist unless must_exist=False."""
    if var not in ENV_FOLDERS:
        raise ValueError(f"unknown nnU-Net folder variable {var!r}; expected one of {ENV_FOLDERS}")
    value = os.environ.get(var)
    if not value:
        raise GeminiUserError(
            f"environment variable {var} is not set: export {var}=/path/to/{var} "
            f"(a folder of your choice; {SETUP_DOC})")
    if must_exist and not os.path.isdir(value):
        raise GeminiUserError(
            f"{var}={value} is not an existing folder: create it (mkdir -p {value}) or export "
            f"{var} to the right folder ({SETUP_DOC})")
    return value


def dataset_prefix(dataset_id: int) -> str:
    return "Dataset%03d_" % dataset_id


def dataset_id_of(dataset_name: str) -> int:
    """3 from 'Dataset003_Liver' (nnU-Net's naming: 'Dataset' + 3 digits + '_' + name)."""
    if not re.fullmatch(r"Dataset\d{3}_.+", dataset_name):
        raise GeminiUserError(f"{dataset_name!r} is not an nnU-Net dataset name (DatasetXXX_Name)")
    return int(dataset_name[7:10])


def resolve_dataset(dataset_name_or_id) -> str:
    """'DatasetXXX_Name' for an id (int or digits) or a name, looked up in the nnUNet_* folders."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = str(maybe_convert_to_dataset_name(dataset_name_or_id))
    except (RuntimeError, ValueError) as e:
        raise _dataset_not_found(dataset_name_or_id, str(e).splitlines()[0]) from None
    # nnU-Net returns a 'DatasetXXX_Name' unchecked: a mistyped name must fail here, not later
    # as "not planned" with advice to plan a dataset that does not exist
    if not any(os.path.isdir(os.path.join(os.environ[v], name)) for v in ENV_FOLDERS
               if os.environ.get(v)):
        raise _dataset_not_found(name)
    return name


def _dataset_not_found(dataset_name_or_id, nnunet_said: str = "") -> GeminiUserError:
    looked = ", ".join(f"{v}={os.environ.get(v) or '<unset>'}" for v in ENV_FOLDERS)
    return GeminiUserError(
        f"dataset {dataset_name_or_id!r} not found (looked for a {_folder_pattern(dataset_name_or_id)} "
        f"folder in {looked}): pass -d with an existing dataset id or name, or fix the nnUNet_* "
        f"variables." + (f" nnU-Net said: {nnunet_said}" if nnunet_said else ""))


def _folder_pattern(dataset_name_or_id) -> str:
    try:
        return "Dataset%03d_*" % int(dataset_name_or_id)
    except (TypeError, ValueError):
        return str(dataset_name_or_id)


def raw_dataset_folder(dataset_name: str) -> str:
    folder = os.path.join(require_env_folder("nnUNet_raw"), dataset_name)
    if not os.path.isdir(folder):
        raise GeminiUserError(f"raw dataset folder {folder} does not exist: put the dataset there "
                              f"or export nnUNet_raw to the folder that holds {dataset_name}")
    return folder


def preprocessed_dataset_folder(dataset_name: str) -> str:
    """nnUNet_preprocessed/DatasetXXX; it exists once nnUNetv2_plan_and_preprocess has run."""
    folder = os.path.join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    if not os.path.isdir(folder):
        raise GeminiUserError(
            f"{dataset_name} is not planned ({folder} does not exist): run "
            f"nnUNetv2_plan_and_preprocess -d {dataset_id_of(dataset_name)} --verify_dataset_integrity")
    return folder


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def configuration_data_identifier(plans: dict, configuration: str) -> str:
    """data_identifier of a configuration, following nnU-Net's `inherits_from` chain."""
    config = plans["configurations"][configuration]
    while "data_identifier" not in config and "inherits_from" in config:
        config = plans["configurations"][config["inherits_from"]]
    return config["data_identifier"]


def is_preprocessed(preprocessed_folder: str, plans: dict, configuration: str) -> bool:
    """True when every training case of dataset.json has its preprocessed .pkl for `configuration`."""
    data_folder = os.path.join(preprocessed_folder, configuration_data_identifier(plans, configuration))
    if not os.path.isdir(data_folder):
        return False
    num_cases = sum(f.endswith(".pkl") for f in os.listdir(data_folder))
    expected = load_json(os.path.join(preprocessed_folder, "dataset.json")).get("numTraining", 1)
    return num_cases >= max(int(expected), 1)


def preprocessed_configurations(dataset_name: str, plans: str = "nnUNetPlans") -> List[str]:
    """Configurations of `plans` whose preprocessed data are complete ([] when not planned)."""
    folder = os.path.join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    plans_file = os.path.join(folder, plans + ".json")
    if not os.path.isfile(plans_file):
        return []
    plans_dict = load_json(plans_file)
    return [c for c in plans_dict["configurations"] if is_preprocessed(folder, plans_dict, c)]


def require_planned(dataset_name: str, plans: str = "nnUNetPlans",
                    configuration: Optional[str] = None) -> str:
    """Path of the plans json; with `configuration`, also checks it exists and is preprocessed."""
    dataset_id = dataset_id_of(dataset_name)
    folder = preprocessed_dataset_folder(dataset_name)
    plans_file = os.path.join(folder, plans + ".json")
    if not os.path.isfile(plans_file):
        hint = "" if plans == "nnUNetPlans" else f" -overwrite_plans_name {plans} (or your planner)"
        raise GeminiUserError(f"{dataset_name} is not planned with plans {plans!r} ({plans_file} "
                              f"missing): run nnUNetv2_plan_and_preprocess -d {dataset_id}{hint}")
    if configuration is not None:
        plans_dict = load_json(plans_file)
        available = sorted(plans_dict["configurations"])
        if configuration not in plans_dict["configurations"]:
            raise GeminiUserError(f"configuration {configuration!r} not in plans {plans_file}: "
                                  f"choose one of {', '.join(available)}")
        if not is_preprocessed(folder, plans_dict, configuration):
            raise GeminiUserError(
                f"{dataset_name} is not preprocessed for configuration {configuration!r}: run "
                f"nnUNetv2_preprocess -d {dataset_id} -plans_name {plans} -c {configuration}")
    return plans_file


def scan_case_folder(folder: str, file_ending: str, num_channels: int, strict: bool = True) -> Dict[str, List[str]]:
    """case id -> channel files (channel order) of an nnU-Net image folder (CASE_XXXX<file_ending>).
    strict: every file must be a channel file of a complete case (GeminiUserError naming the file
    and the fix); not strict: other files are ignored and the cases found are listed as they are."""
    expected = f"CASE_XXXX{file_ending} with XXXX = 0000..{num_channels - 1:04d}"
    channel_re = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    by_case: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue  # hidden files (.DS_Store) and sub-folders are not images
        if not name.endswith(file_ending):
            if not strict:
                continue
            raise GeminiUserError(f"{path} has the wrong file ending: dataset.json says "
                                  f"'{file_ending}', so name it {expected} (or move it out).")
        m = channel_re.fullmatch(name)
        if m is None or (not strict and int(m.group(2)) >= num_channels):
            if not strict:
                continue
            raise GeminiUserError(f"{path} has no channel suffix: name it {expected}.")
        channel = int(m.group(2))
        if channel >= num_channels:
            raise GeminiUserError(f"{path} has channel suffix _{m.group(2)} but dataset.json "
                                  f"defines {num_channels} channel(s): name it {expected}.")
        by_case.setdefault(m.group(1), {})[channel] = path
    if not strict:
        return {case: [channels[c] for c in sorted(channels)] for case, channels in sorted(by_case.items())}
    result = {}
    for case, channels in by_case.items():
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            missing_names = ", ".join(f"{case}_{c:04d}{file_ending}" for c in missing)
            raise GeminiUserError(f"case '{case}' in {folder} misses channel file(s) "
                                  f"{missing_names}: every case needs {expected}.")
        # the per-case matcher nnU-Net uses for imagesTr (validated above, so it finds them all)
        from nnunetv2.utilities.utils import create_paths_fn
        result[case] = create_paths_fn(folder, sorted(os.listdir(folder)), file_ending, case)
    return result


def _case_ids(folder: str, file_ending: str) -> List[str]:
    """Sorted case ids of the CASE_XXXX<file_ending> images in `folder` ([] if no folder)."""
    if not os.path.isdir(folder):
        return []
    return sorted(scan_case_folder(folder, file_ending, num_channels=10 ** 4, strict=False))


def list_labelled_cases(raw_folder: str) -> List[str]:
    """Case ids of imagesTr that have a label in labelsTr (dataset.json's file_ending)."""
    dataset_json = load_json(os.path.join(raw_folder, "dataset.json"))
    if "dataset" in dataset_json:  # nnU-Net's explicit file list variant
        return sorted(dataset_json["dataset"])
    ending = dataset_json["file_ending"]
    return [c for c in _case_ids(os.path.join(raw_folder, "imagesTr"), ending)
            if os.path.isfile(os.path.join(raw_folder, "labelsTr", c + ending))]


def list_unlabelled_cases(raw_folder: str) -> List[str]:
    """Case ids in imagesUnlabeled/ (CASE_XXXX<file_ending>); nnU-Net itself ignores that folder."""
    ending = load_json(os.path.join(raw_folder, "dataset.json"))["file_ending"]
    return _case_ids(os.path.join(raw_folder, "imagesUnlabeled"), ending)


def count_labelled_images(raw_folder: str) -> int:
    return len(list_labelled_cases(raw_folder))


def count_unlabelled_images(raw_folder: str) -> int:
    return len(list_unlabelled_cases(raw_folder))
