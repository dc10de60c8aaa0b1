"""gemini_fewshot_split: few-shot folds as nnU-Net folds, in ONE splits_final.json.

Every (N, draw) gets its own fold index, so `nnUNetv2_train ID CONFIG FOLD` trains on exactly N
labelled cases. The mapping fold -> (N, draw) is written beside it as splits_fewshot.json.
Works with fewer than 5 labelled cases, where nnU-Net's own 5-fold split fails.
"""
import argparse
import os
from typing import Dict, List, Sequence

import numpy as np

from nnunet_gemini.atomic import write_json_atomic
from nnunet_gemini.datasets import (
    dataset_id_of,
    list_labelled_cases,
    load_json,
    preprocessed_dataset_folder,
    resolve_dataset,
)
from nnunet_gemini.errors import GeminiUserError, run_cli

SPLITS_FILE = "splits_final.json"
MAPPING_FILE = "splits_fewshot.json"


def fewshot_folds(case_ids: Sequence[str], ns: Sequence[int], draws: int = 3, seed: int = 0,
                  min_val: int = 1) -> List[Dict]:
    """[{fold, n, draw, train, val}] for each N of `ns` (in the given order) and draw 0..draws-1.

    train: N cases drawn without replacement by a generator seeded with (seed, N, draw), so a
    fold does not change when other N or more draws are added. val: the remaining labelled
    cases, at least `min_val` of them; when N takes every case and none are left, the training
    cases validate (as with nnU-Net's fold `all`; nnU-Net needs a non-empty validation set).
    """
    cases = sorted(set(case_ids))
    if len(cases) != len(case_ids):
        raise GeminiUserError("duplicate case ids in the labelled cases")
    if draws < 1:
        raise GeminiUserError(f"--draws {draws}: need at least 1 draw")
    if min_val < 0:
        raise GeminiUserError(f"--min_val {min_val}: must be >= 0")
    folds = []
    for n in ns:
        if not 1 <= n <= len(cases):
            raise GeminiUserError(f"-n {n}: the dataset has {len(cases)} labelled cases; "
                                  f"choose N between 1 and {len(cases)}")
        left = len(cases) - n
        if 0 < left < min_val:
            raise GeminiUserError(
                f"-n {n} leaves {left} of {len(cases)} labelled cases for validation, fewer than "
                f"--min_val {min_val}: lower -n or --min_val (or use -n {len(cases)}, which "
                f"validates on the training cases)")
        for draw in range(draws):
            rng = np.random.default_rng([seed, n, draw])
            picked = set(rng.choice(len(cases), size=n, replace=False).tolist())
            train = [c for i, c in enumerate(cases) if i in picked]
            val = [c for i, c in enumerate(cases) if i not in picked] or list(train)
            folds.append({"fold": len(folds), "n": n, "draw": draw, "train": train, "val": val})
    return folds


def labelled_case_ids(dataset_name: str) -> List[str]:
    """Labelled case ids from nnUNet_raw (imagesTr with labelsTr), else from the preprocessed
    gt_segmentations/ that nnU-Net copies during planning."""
    raw_root = os.environ.get("nnUNet_raw")
    raw_folder = os.path.join(raw_root, dataset_name) if raw_root else None
    if raw_folder and os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        return list_labelled_cases(raw_folder)
    preprocessed = preprocessed_dataset_folder(dataset_name)
    ending = load_json(os.path.join(preprocessed, "dataset.json"))["file_ending"]
    gt_folder = os.path.join(preprocessed, "gt_segmentations")
    if not os.path.isdir(gt_folder):
        raise GeminiUserError(f"no labelled cases found for {dataset_name} (no raw dataset under "
                              f"nnUNet_raw and no {gt_folder}): export nnUNet_raw")
    return sorted(f[:-len(ending)] for f in os.listdir(gt_folder) if f.endswith(ending))


def write_fewshot_split(dataset_name_or_id, ns: Sequence[int], draws: int = 3, seed: int = 0,
                        min_val: int = 1, overwrite: bool = False) -> List[Dict]:
    """Write splits_final.json and splits_fewshot.json into nnUNet_preprocessed/DatasetXXX."""
    dataset_name = resolve_dataset(dataset_name_or_id)
    folder = preprocessed_dataset_folder(dataset_name)
    splits_path = os.path.join(folder, SPLITS_FILE)
    if os.path.exists(splits_path) and not overwrite:
        raise GeminiUserError(f"{splits_path} exists (folds already in use there would change): "
                              f"pass --overwrite to replace it")
    folds = fewshot_folds(labelled_case_ids(dataset_name), ns, draws, seed, min_val)
    write_json_atomic(splits_path, [{"train": f["train"], "val": f["val"]} for f in folds])
    write_json_atomic(os.path.join(folder, MAPPING_FILE),
                {"dataset": dataset_name, "seed": seed, "draws": draws, "min_val": min_val, "folds": folds})
    return folds


def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog="gemini_fewshot_split", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Write few-shot folds into nnUNet_preprocessed/DatasetXXX/{SPLITS_FILE} "
                    f"(one fold index per (N, draw)) and the mapping into {MAPPING_FILE}. Train "
                    "with: nnUNetv2_train ID CONFIG FOLD.")
    parser.add_argument("-d", required=True, help="dataset id or name (must be planned)")
    parser.add_argument("-n", type=int, nargs="+", required=True,
                        help="numbers of labelled training cases, e.g. -n 1 2 5")
    parser.add_argument("--draws", type=int, default=3, help="random draws per N")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    parser.add_argument("--min_val", type=int, default=1,
                        help="least validation cases per fold (an N that uses every labelled "
                             "case validates on its training cases instead)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {SPLITS_FILE}")
    args = parser.parse_args(argv)
    folds = write_fewshot_split(args.d, args.n, args.draws, args.seed, args.min_val, args.overwrite)
    dataset_name = resolve_dataset(args.d)
    print(f"wrote {os.path.join(preprocessed_dataset_folder(dataset_name), SPLITS_FILE)} "
          f"and {MAPPING_FILE} beside it")
    print("fold  N  draw  #val  train")
    for f in folds:
        val = "= train" if f["val"] == f["train"] else str(len(f["val"]))
        print(f"{f['fold']:>4} {f['n']:>2} {f['draw']:>5} {val:>7}  {' '.join(f['train'])}")
    print(f"train a fold: nnUNetv2_train {dataset_id_of(dataset_name)} 3d_fullres FOLD -tr nnUNetTrainerGEMINI")


def main(argv=None):
    raise SystemExit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
