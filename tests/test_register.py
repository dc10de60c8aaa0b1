"""gemini_register: a moving image that is a known shift of the fixed one, registered with a
deformer whose output is exactly that shift (last conv: zero weights, bias = the shift), must
come back onto the fixed image, through nnU-Net's preprocessing (the moving image is also
zero-padded, which preprocessing crops away, and placed at another origin) and back into the
fixed image's original geometry."""
import json
import os
import sys

import numpy as np
import pytest
from helpers import run_command

SHIFT = np.array([2, 3, -4])          # voxels, numpy axis order (z, y, x)
PAD = ((3, 1), (0, 2), (4, 0))        # zero padding of the moving image (cropped by preprocessing)


@pytest.fixture(scope="module")
def shifted_pair(planned_demo, tmp_path_factory):
    """Fixed = a demo test case; moving = the same case rolled by SHIFT, zero-padded, moved in
    space; a gemini_pretrain-schema checkpoint whose deformer outputs SHIFT everywhere."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_gemini.checkpoints import KIND_PRETRAIN, atomic_torch_save
    from nnunet_gemini.heads import build_deformer
    from nnunet_gemini.network import build_segmentation_network
    from nnunet_gemini.pretrained import FORMAT_VERSION

    root = tmp_path_factory.mktemp("register")
    raw = planned_demo.raw_folder
    case = sorted(f for f in os.listdir(os.path.join(raw, "imagesTs")))[0][:-len("_0000.nii.gz")]
    fixed = sitk.ReadImage(os.path.join(raw, "imagesTs", case + "_0000.nii.gz"))
    fixed_label = sitk.ReadImage(os.path.join(raw, "labelsTs", case + ".nii.gz"))
    folder = root / "pair"
    labels = root / "pair_labels"
    folder.mkdir()
    labels.mkdir()

    def moved(image):
        array = np.pad(np.roll(sitk.GetArrayFromImage(image), SHIFT, axis=(0, 1, 2)), PAD)
        out = sitk.GetImageFromArray(array)
        out.SetSpacing(image.GetSpacing())
        out.SetOrigin((12.5, -40.0, 3.0))
        return out

    sitk.WriteImage(fixed, str(folder / "fixed_0000.nii.gz"))
    sitk.WriteImage(fixed_label, str(labels / "fixed.nii.gz"))
    sitk.WriteImage(moved(fixed), str(folder / "moving_0000.nii.gz"))
    sitk.WriteImage(moved(fixed_label), str(labels / "moving.nii.gz"))

    plans = json.load(open(os.path.join(planned_demo.preprocessed_folder, "nnUNetPlans.json")))
    dataset_json = json.load(open(os.path.join(planned_demo.preprocessed_folder, "dataset.json")))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    network = build_segmentation_network(pm, cm, 1, len(dataset_json["labels"]), enable_deep_supervision=False)
    checkpoints = {}
    for deformer_input in ("features", "images"):  # the released deformer, and one that sees the images
        deformer = build_deformer(network, resolution="full", deformer_input=deformer_input)
        with torch.no_grad():
            deformer.out.weight.zero_()
            deformer.out.bias.copy_(torch.tensor(SHIFT[pm.transpose_forward], dtype=torch.float32))
        checkpoints[deformer_input] = str(root / deformer_input / "fold_all" / "checkpoint_final.pth")
        spec = {"resolution": "full", "integration_steps": 7}  # the features one: as written before the input
        atomic_torch_save({"gemini_kind": KIND_PRETRAIN, "format_version": FORMAT_VERSION,
                           "network_weights": network.state_dict(), "deformer_weights": deformer.state_dict(),
                           "meta": {"dataset_name": planned_demo.dataset_name, "plans_identifier": "nnUNetPlans",
                                    "configuration": "3d_fullres", "deformation": "diffeomorphic",
                                    "deformer": spec if deformer_input == "features" else
                                    dict(spec, input=deformer_input)}}, checkpoints[deformer_input])
    return dict(root=root, folder=folder, labels=labels, checkpoint=checkpoints["features"],
                images_checkpoint=checkpoints["images"], fixed=fixed, fixed_label=fixed_label, env=planned_demo.env)


def _inside(shape):
    """Mask of fixed voxels p whose shifted source p + SHIFT lies inside the image."""
    index = np.indices(shape)
    return np.all([(index[a] + SHIFT[a] >= 0) & (index[a] + SHIFT[a] < shape[a]) for a in range(3)], axis=0)


def test_register_recovers_known_shift_in_fixed_geometry(shifted_pair):
    import SimpleITK as sitk

    p, out = shifted_pair, shifted_pair["root"] / "out"
    proc = run_command([sys.executable, "-m", "nnunet_gemini.register", "--checkpoint", p["checkpoint"],
                        "-m", str(p["folder"] / "moving_0000.nii.gz"), "-f", str(p["folder"] / "fixed_0000.nii.gz"),
                        "--moving_label", str(p["labels"] / "moving.nii.gz"),
                        "--fixed_label", str(p["labels"] / "fixed.nii.gz"), "-o", str(out), "-device", "cpu"],
                       p["env"], timeout=600)
    assert "folding fraction" in proc.stdout
    warped = sitk.ReadImage(str(out / "warped_moving_0000.nii.gz"))
    warped_label = sitk.ReadImage(str(out / "warped_moving_label.nii.gz"))
    field = sitk.ReadImage(str(out / "displacement_mm.nii.gz"))
    for image in (warped, warped_label, field):  # the fixed image's original geometry
        assert image.GetSize() == p["fixed"].GetSize()
        assert np.allclose(image.GetSpacing(), p["fixed"].GetSpacing())
        assert np.allclose(image.GetOrigin(), p["fixed"].GetOrigin())
        assert np.allclose(image.GetDirection(), p["fixed"].GetDirection())
    assert field.GetNumberOfComponentsPerPixel() == 3

    fixed_array = sitk.GetArrayFromImage(p["fixed"])
    inside = _inside(fixed_array.shape)
    error = np.abs(sitk.GetArrayFromImage(warped) - fixed_array)[inside]
    assert error.max() < 1e-3 * np.ptp(fixed_array)
    report = json.load(open(out / "registration.json"))
    assert report["folding_fraction"] == 0.0
    assert report["dice"]["mean"] > 0.97
    label = sitk.GetArrayFromImage(p["fixed_label"])
    assert np.array_equal(sitk.GetArrayFromImage(warped_label)[inside], label[inside])

    # the written field, applied by SimpleITK itself, reproduces the written warped image
    moving = sitk.ReadImage(str(p["folder"] / "moving_0000.nii.gz"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    resampled = sitk.Resample(moving, p["fixed"], transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.allclose(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(warped), atol=1e-4)
    # and in millimetres: fixed voxel p sits at moving voxel p + SHIFT + pad (other origin, same spacing)
    d = sitk.GetArrayFromImage(field)[inside]
    expected = (SHIFT + np.array([b for b, _ in PAD]))[::-1] * np.array(p["fixed"].GetSpacing()) \
        + np.array(moving.GetOrigin()) - np.array(p["fixed"].GetOrigin())
    assert np.allclose(d, expected, atol=1e-3)


def test_pairs_from_folder_reports_dice_per_ordered_pair(shifted_pair, monkeypatch):
    from nnunet_gemini.register import load_from_pretrain_checkpoint, register_folder

    p = shifted_pair
    monkeypatch.setenv("nnUNet_preprocessed", p["env"]["nnUNet_preprocessed"])
    model = load_from_pretrain_checkpoint(p["checkpoint"], "cpu")
    # the deformer as the checkpoint's spec says (keys it leaves out take the spec's defaults)
    assert model.step.spec() == {"deformation": "diffeomorphic", "resolution": "full", "bidirectional": False,
                                 "integration_steps": 7, "input": "features"}
    summary = register_folder(model, str(p["folder"]), str(p["labels"]), str(p["root"] / "pairs"),
                              write_images=False)
    dice = {(q["moving"], q["fixed"]): q["dice"]["mean"] for q in summary["pairs"]}
    assert set(dice) == {("moving", "fixed"), ("fixed", "moving")}
    assert dice["moving", "fixed"] > 0.97
    # the same field the other way round doubles the misalignment: the direction matters
    assert dice["fixed", "moving"] < dice["moving", "fixed"] - 0.1
    written = json.load(open(p["root"] / "pairs" / "pairs.json"))
    assert written["mean_dice"] == pytest.approx(np.mean(list(dice.values())))
    assert not (p["root"] / "pairs" / "moving_to_fixed").exists()  # write_images=False


def test_cli_rejects_two_models(shifted_pair):
    proc = __import__("subprocess").run(
        [sys.executable, "-m", "nnunet_gemini.register", "--checkpoint", shifted_pair["checkpoint"], "-d", "987",
         "-m", "a", "-f", "b", "-o", "x"], env=shifted_pair["env"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "exactly one model" in proc.stderr


def test_trainer_results_are_rebuilt_from_their_spec(shifted_pair, tmp_path, monkeypatch):
    """A trainer checkpoint's spec is read as written (bidirectional too, not forced from the
    deformation model); --deformation may only fill in a deformation the checkpoint does not record."""
    import shutil

    import torch

    from nnunet_gemini.checkpoints import atomic_torch_save
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.register import load_from_trainer_results

    p = shifted_pair
    pretrain = torch.load(p["checkpoint"], map_location="cpu", weights_only=True)
    name = pretrain["meta"]["dataset_name"]
    folder = tmp_path / name / "nnUNetTrainerGEMINI__nnUNetPlans__3d_fullres"
    os.makedirs(folder / "fold_all")
    preprocessed = os.path.join(p["env"]["nnUNet_preprocessed"], name)
    shutil.copy(os.path.join(preprocessed, "nnUNetPlans.json"), folder / "plans.json")
    shutil.copy(os.path.join(preprocessed, "dataset.json"), folder / "dataset.json")
    gemini = {"deformer_weights": pretrain["deformer_weights"], "deformation": "diffeomorphic",
              "deformer": {"resolution": "full", "bidirectional": True, "integration_steps": 5}}
    atomic_torch_save({"network_weights": pretrain["network_weights"], "gemini": gemini},
                      str(folder / "fold_all" / "checkpoint_final.pth"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    model = load_from_trainer_results(name, device="cpu")
    assert model.step.spec() == {"deformation": "diffeomorphic", "resolution": "full", "bidirectional": True,
                                 "integration_steps": 5, "input": "features"}
    with pytest.raises(GeminiUserError, match="records deformation 'diffeomorphic'; drop --deformation"):
        load_from_trainer_results(name, deformation="displacement", device="cpu")


def test_weights_that_do_not_fit_the_network_are_refused_naming_the_file_and_the_fix(shifted_pair, tmp_path,
                                                                                       monkeypatch, capsys):
    """One weight rule (pretrained.load_network_weights) for both checkpoint kinds: a network tensor
    of another shape is an error, never a random weight kept silently; the segmentation convs alone
    may differ (other labels; registration does not use them)."""
    import shutil

    import torch

    from nnunet_gemini.checkpoints import atomic_torch_save
    from nnunet_gemini.errors import GeminiUserError, run_cli
    from nnunet_gemini.register import _main
    from nnunet_gemini.trained_model import load_from_pretrain_checkpoint, load_from_trainer_results

    p = shifted_pair
    monkeypatch.setenv("nnUNet_preprocessed", p["env"]["nnUNet_preprocessed"])
    ckpt = torch.load(p["checkpoint"], map_location="cpu", weights_only=True)
    weights = ckpt["network_weights"]
    key = next(k for k, v in weights.items() if v.ndim == 5 and ".seg_layers." not in k)
    bad = dict(weights, **{key: torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])})
    # other labels: only the segmentation convs differ, which is fine
    seg = {k: torch.zeros(7, *v.shape[1:]) for k, v in weights.items() if ".seg_layers." in k}
    other_labels = str(tmp_path / "labels" / "fold_all" / "checkpoint_final.pth")
    atomic_torch_save(dict(ckpt, network_weights=dict(weights, **seg)), other_labels)
    model = load_from_pretrain_checkpoint(other_labels, "cpu")
    assert torch.equal(model.network.state_dict()[key], weights[key])

    misfit = str(tmp_path / "misfit" / "fold_all" / "checkpoint_final.pth")
    atomic_torch_save(dict(ckpt, network_weights=bad), misfit)
    shape, wanted = tuple(bad[key].shape), tuple(weights[key].shape)
    expected = (rf"checkpoint {misfit}: weight '{key}' has shape \({', '.join(map(str, shape))}\) but this network "
                rf"needs \({', '.join(map(str, wanted))}\): the network was built from .*nnUNetPlans\.json")
    with pytest.raises(GeminiUserError, match=expected):
        load_from_pretrain_checkpoint(misfit, "cpu")
    missing = str(tmp_path / "missing" / "fold_all" / "checkpoint_final.pth")
    atomic_torch_save(dict(ckpt, network_weights={k: v for k, v in weights.items() if k != key}), missing)
    with pytest.raises(GeminiUserError, match=rf"checkpoint {missing} has no weight '{key}' that this network needs"):
        load_from_pretrain_checkpoint(missing, "cpu")
    # gemini_register itself: exit 2 and the message, no registration
    capsys.readouterr()
    rc = run_cli(_main, ["--checkpoint", misfit, "-m", str(p["folder"] / "moving_0000.nii.gz"),
                         "-f", str(p["folder"] / "fixed_0000.nii.gz"), "-o", str(tmp_path / "out"), "-device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"ERROR: checkpoint {misfit}: weight '{key}' has shape" in err, err
    assert "export the nnUNet_preprocessed it was pre-trained with" in err
    assert not (tmp_path / "out").exists()

    # a trainer results folder: the same rule
    name = ckpt["meta"]["dataset_name"]
    folder = tmp_path / "results" / name / "nnUNetTrainerGEMINI__nnUNetPlans__3d_fullres"
    os.makedirs(folder / "fold_all")
    preprocessed = os.path.join(p["env"]["nnUNet_preprocessed"], name)
    shutil.copy(os.path.join(preprocessed, "nnUNetPlans.json"), folder / "plans.json")
    shutil.copy(os.path.join(preprocessed, "dataset.json"), folder / "dataset.json")
    atomic_torch_save({"network_weights": bad, "gemini": {"deformer_weights": ckpt["deformer_weights"],
                                                          "deformation": "diffeomorphic",
                                                          "deformer": {"resolution": "full"}}},
                      str(folder / "fold_all" / "checkpoint_final.pth"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    with pytest.raises(GeminiUserError, match=rf"results .*checkpoint_final\.pth: weight '{key}' has shape .*: the "
                                              rf"network was built from .*plans\.json, which nnU-Net wrote beside it"):
        load_from_trainer_results(name, device="cpu")


# crops of the fixed image (numpy order z, y, x) of three shapes; the demo image is nonzero
# everywhere, so preprocessing keeps each crop whole, and they are small, so registering them is quick
CROPS = {"a": (slice(4, 16), slice(8, 24), slice(8, 24)), "b": (slice(8, 16), slice(4, 20), slice(4, 28)),
         "c": (slice(2, 18), slice(10, 18), slice(10, 26))}


@pytest.fixture(scope="module")
def shaped_cases(shifted_pair):
    """Cases of other shapes than the shifted pair's: the CROPS of `fixed` (each keeps its place in
    space) in `crops`, and a folder `zero` of `fixed`, `moving` (one preprocessed shape) and crop b;
    labels CASE.nii.gz in `shaped_labels`."""
    import shutil

    import SimpleITK as sitk

    p = shifted_pair
    crops, zero, labels = p["root"] / "crops", p["root"] / "zero", p["root"] / "shaped_labels"
    for folder in (crops, zero, labels):
        folder.mkdir()
    for case in ("fixed", "moving"):
        shutil.copy(p["folder"] / f"{case}_0000.nii.gz", zero)
        shutil.copy(p["labels"] / f"{case}.nii.gz", labels)
    for case, (z, y, x) in CROPS.items():
        sitk.WriteImage(p["fixed"][x, y, z], str(crops / f"{case}_0000.nii.gz"))  # sitk indexes (x, y, z)
        sitk.WriteImage(p["fixed_label"][x, y, z], str(labels / f"{case}.nii.gz"))
    shutil.copy(crops / "b_0000.nii.gz", zero)
    return dict(p, crops=crops, zero=zero, shaped_labels=labels)


def _field_of_features(checkpoint):
    """The shifted pair's model with a deformer whose field depends on the features (seeded random
    last conv), so features of the wrong case or grid change the result."""
    import torch

    from nnunet_gemini.register import load_from_pretrain_checkpoint

    model = load_from_pretrain_checkpoint(checkpoint, "cpu")
    out = model.step.deformer.out
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out.weight.copy_(0.05 * torch.randn(out.weight.shape, generator=g))
        out.bias.zero_()
    return model


def test_cached_features_stay_on_each_case_grid_whatever_the_pair_order(shaped_cases, monkeypatch):
    """register_cases caches a case's features on its own grid only: a moving case of another shape
    is resampled onto the fixed grid and its features there are not cached. Cases of three shapes
    registered in turn as moving and fixed keep features of their own grid, and a pair registered
    after others gives exactly what it gives registered first with freshly prepared cases."""
    import SimpleITK as sitk

    from nnunet_gemini.register import prepare_case, register_cases

    p = shaped_cases
    monkeypatch.setenv("nnUNet_preprocessed", p["env"]["nnUNet_preprocessed"])
    model = _field_of_features(p["checkpoint"])
    files = {c: [str(p["crops"] / f"{c}_0000.nii.gz")] for c in CROPS}
    label = {c: str(p["shaped_labels"] / f"{c}.nii.gz") for c in CROPS}
    prepared = {c: prepare_case(model, files[c]) for c in CROPS}
    shape = {c: tuple(case.data.shape[1:]) for c, case in prepared.items()}
    assert shape == {c: tuple(s.stop - s.start for s in crop) for c, crop in CROPS.items()}  # three grids

    # a is a moving case (resampled onto b's grid) before it is a fixed one (c -> a); b and c are
    # moving cases after they were fixed ones (their cache must stay); then the reverse of each
    # pair, with every cache filled; and the first pair once more
    first = [("a", "b"), ("b", "c"), ("c", "a")]
    order = first + [(f, m) for m, f in first] + [first[0]]
    results = []
    for m, f in order:
        results.append(register_cases(model, prepared[m], prepared[f], label[m], label[f]))
        for c, case in prepared.items():
            if case.features is not None:
                assert tuple(case.features.shape[2:]) == shape[c], (m, f, c)
    assert all(case.features is not None for case in prepared.values())
    assert len({round(r.dice["mean"], 6) for r in results[:6]}) == 6  # six pairs, six results

    def assert_same(alone, after, pair):
        assert np.array_equal(sitk.GetArrayFromImage(alone.displacement_mm),
                              sitk.GetArrayFromImage(after.displacement_mm)), pair
        assert alone.folding_fraction == after.folding_fraction, pair
        assert json.dumps(alone.dice) == json.dumps(after.dice), pair  # NaN (absent structure) compares too

    assert_same(results[0], results[-1], order[0])  # registered first with fresh cases, and after all the others
    for (m, f), after in zip(order[3:6], results[3:6]):
        alone = register_cases(model, prepare_case(model, files[m]), prepare_case(model, files[f]), label[m],
                               label[f])
        assert_same(alone, after, (m, f))


def test_zero_field_record_is_the_pipeline_with_an_identity_field(shaped_cases, tmp_path, monkeypatch):
    """Benchmark.zero_field_dice zeroes the deformer's last conv (the checkpoint's deformer outputs
    SHIFT): every field is exactly 0, nothing folds, and each pair's warped-label Dice is the
    moving label carried onto the fixed grid by the preprocessing alone (displacement_field_mm of
    a zero field); the record goes into results.json under ZERO_FIELD, one entry per ordered pair."""
    import itertools

    import SimpleITK as sitk
    import torch

    from nnunet_gemini.benchmark import RESULTS_JSON, ZERO_FIELD, Benchmark
    from nnunet_gemini.register import (
        displacement_field_mm,
        label_dice,
        load_from_pretrain_checkpoint,
        prepare_case,
        warp_with_field,
    )

    p = shaped_cases
    monkeypatch.setenv("nnUNet_preprocessed", p["env"]["nnUNet_preprocessed"])
    model = load_from_pretrain_checkpoint(p["checkpoint"], "cpu")
    fields, real = [], model.step.fields
    monkeypatch.setattr(model.step, "fields", lambda *args: fields.append(real(*args)) or fields[-1])
    bench = Benchmark.__new__(Benchmark)  # what zero_field_dice uses: the results and where they are saved
    bench.results_path, bench.results = tmp_path / RESULTS_JSON, {"registration": {}}
    before = {k: v.clone() for k, v in model.step.deformer.state_dict().items()}
    out = bench.zero_field_dice(model, p["zero"], p["shaped_labels"], "the test's cases")
    after = model.step.deformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's deformer is given back unchanged

    cases = ["b", "fixed", "moving"]  # the folder's, in register_folder's order
    assert out["pairs"] == len(cases) * (len(cases) - 1) == len(out["per_pair"]) == len(fields)
    assert [(q["moving"], q["fixed"]) for q in out["per_pair"]] == list(itertools.permutations(cases, 2))
    assert all(torch.count_nonzero(t) == 0 for f in fields for t in f)  # every field, raw and integrated
    assert all(q["folding_fraction"] == 0.0 for q in out["per_pair"])
    dice = [q["dice"]["mean"] for q in out["per_pair"]]
    assert out["pairs_of"] == "the test's cases"
    assert (out["dice_mean"], out["dice_std"]) == (float(np.nanmean(dice)), float(np.nanstd(dice)))
    written = json.loads((tmp_path / RESULTS_JSON).read_text())["registration"]
    assert list(written) == [ZERO_FIELD] and json.dumps(written[ZERO_FIELD]) == json.dumps(out)

    labels = model.dataset_json["labels"]
    prepared = {c: prepare_case(model, [str(p["zero"] / f"{c}_0000.nii.gz")]) for c in cases}
    read = {c: sitk.ReadImage(str(p["shaped_labels"] / f"{c}.nii.gz")) for c in cases}
    for q in out["per_pair"]:
        moving, fixed = prepared[q["moving"]], prepared[q["fixed"]]
        zero = torch.zeros(1, 3, *fixed.data.shape[1:])
        field_mm = sitk.GetImageFromArray(displacement_field_mm(fixed, moving, zero), isVector=True)
        field_mm.CopyInformation(fixed.images[0])
        warped = warp_with_field(read[q["moving"]], fixed.images[0], field_mm, sitk.sitkNearestNeighbor)
        expected = label_dice(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(read[q["fixed"]]), labels)
        assert json.dumps(q["dice"]) == json.dumps(expected), q
    # the shifted pair (one preprocessed shape) without its shift, either way: the label against itself rolled
    label = sitk.GetArrayFromImage(p["fixed_label"])
    unshifted = label_dice(np.roll(label, SHIFT, axis=(0, 1, 2)), label, labels)
    for q in out["per_pair"]:
        if {q["moving"], q["fixed"]} == {"moving", "fixed"}:
            assert json.dumps(q["dice"]) == json.dumps(unshifted), q


def test_a_deformer_that_sees_the_images_registers_through_the_cli(shifted_pair):
    """A checkpoint whose deformer sees the images (gemini_pretrain --deformer_input images) is rebuilt
    so and given the moving and fixed images on the fixed grid: the known shift comes back."""
    p, out = shifted_pair, shifted_pair["root"] / "out_images"
    run_command([sys.executable, "-m", "nnunet_gemini.register", "--checkpoint", p["images_checkpoint"],
                 "-m", str(p["folder"] / "moving_0000.nii.gz"), "-f", str(p["folder"] / "fixed_0000.nii.gz"),
                 "--moving_label", str(p["labels"] / "moving.nii.gz"),
                 "--fixed_label", str(p["labels"] / "fixed.nii.gz"), "-o", str(out), "-device", "cpu"],
                p["env"], timeout=600)
    assert json.load(open(out / "registration.json"))["dice"]["mean"] > 0.97
