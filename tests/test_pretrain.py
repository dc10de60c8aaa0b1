"""gemini_pretrain: CLI end to end (pool incl. an imagesUnlabeled-only case, outputs, weights_only
loading, nnUNetv2_train -pretrained_weights starts), learning on a fixed pair, --c resume with
optimizer state, DDP with 2 CPU processes (gloo), the non-finite guard, and pretrained.py."""
import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import DEMO_ID, private_demo_copy, run_command

CLI = [sys.executable, "-m", "nnunet_gemini.pretraining.run_pretraining"]
TINY = ["-device", "cpu", "--epochs", "1", "--iters_per_epoch", "2", "-np", "1"]


@pytest.fixture(scope="module")
def demo(planned_demo, tmp_path_factory):
    """A private copy of the planned demo (the pool is written into nnUNet_preprocessed) and one
    tiny CLI pre-training run on it: 1 epoch x 2 iterations."""
    root = str(tmp_path_factory.mktemp("pretrain"))
    env = private_demo_copy(planned_demo, root, nnUNet_n_proc_DA="0")
    proc = run_command(CLI + ["-d", str(DEMO_ID), *TINY, "--example_every", "1"], env)
    out = os.path.join(env["nnUNet_results"], planned_demo.dataset_name,
                       "GEMINIPretrain__nnUNetPlans__3d_fullres", "fold_all")
    return dict(env=env, out=out, name=planned_demo.dataset_name, stdout=proc.stdout, stderr=proc.stderr)


@pytest.fixture
def in_process_env(demo, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(var, demo["env"][var])
    return demo


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------- CLI
def test_cli_outputs_at_documented_paths(demo):
    from nnunet_gemini.unlabeled import MANIFEST_NAME
    pool = os.path.join(demo["env"]["nnUNet_preprocessed"], demo["name"], "nnUNetPlans_3d_fullres_gemini_unlabeled")
    manifest = _load_json(os.path.join(pool, MANIFEST_NAME))
    sources = {c["case_id"]: c["source"] for c in manifest["cases"]}
    assert sources["GeminiTiny_U000"] == "imagesUnlabeled"  # a case only in imagesUnlabeled/
    assert sum(s == "imagesTr" for s in sources.values()) == 4
    assert not any(s == "imagesTs" for s in sources.values())  # never without --include_test_images
    out = demo["out"]
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "progress.png",
                 "example_pair_epoch_0001.png", "example_restoration_epoch_0001.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    logs = glob.glob(os.path.join(out, "training_log_*.txt"))
    assert len(logs) == 1
    text = open(logs[0]).read()
    assert "Epoch 0" in text and "folding_fraction" in text and "Pre-training done: 2 iterations" in text
    assert "glibc malloc: freed memory kept for reuse" in text  # on a CPU, as the trainer
    assert not glob.glob(os.path.join(out, ".gemini_tmp_*"))  # no temporary leftovers

    ckpt = _load(os.path.join(out, "checkpoint_final.pth"))  # weights_only=True must work
    assert ckpt["gemini_kind"] == "gemini_pretrain" and ckpt["format_version"] == 1
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 2
    meta = ckpt["meta"]
    assert meta["dataset_name"] == demo["name"] and meta["configuration"] == "3d_fullres"
    assert meta["compat"]["network_arch_class_name"].endswith("PlainConvUNet")
    assert sorted(meta["unlabeled_cases"]) == sorted(sources)
    assert meta["deformation"] == "diffeomorphic" and meta["versions"]["torch"] == torch.__version__
    # the deformer spec, in the layout every reader reads (gemini_step.spec_from_checkpoint)
    assert meta["deformer"] == {"resolution": "half", "bidirectional": False, "integration_steps": 7,
                                "input": "features"}
    assert all(t.device.type == "cpu" for t in ckpt["network_weights"].values())
    assert any(".seg_layers." in k for k in ckpt["network_weights"])  # the FULL network
    assert ckpt["deformer_weights"] and ckpt["restoration_weights"]


def _load_json(path):
    import json
    with open(path) as f:
        return json.load(f)


def test_nnunetv2_train_starts_from_the_checkpoint(demo, tmp_path):
    """Plain nnU-Net accepts the file: its load_pretrained_weights runs and training starts."""
    env = dict(demo["env"], PYTHONUNBUFFERED="1", nnUNet_results=str(tmp_path))
    ckpt = os.path.join(demo["out"], "checkpoint_final.pth")
    proc = subprocess.Popen(["nnUNetv2_train", str(DEMO_ID), "3d_fullres", "all", "-pretrained_weights", ckpt,
                             "-device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, loaded, started = [], False, False
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not started:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            loaded = loaded or "Loading pretrained weights from file" in line
            started = loaded and "Epoch 0" in line  # nnU-Net's first epoch line after the load
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert loaded and started, "".join(seen[-60:])


def test_resume_continues_at_the_right_epoch_with_optimizer_state(demo, tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(demo["out"], out)
    os.remove(os.path.join(out, "checkpoint_final.pth"))
    before = _load(os.path.join(out, "checkpoint_latest.pth"))
    # another epoch length would miscount the run's iterations: refused, naming the flag, nothing written
    refused = subprocess.run(CLI + ["-d", str(DEMO_ID), *TINY, "--epochs", "2", "--iters_per_epoch", "1", "--c",
                                    "-o", out], env=demo["env"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2  # a user error, as every ERROR of docs/reliability.md
    assert ("was trained with --iters_per_epoch 2, not 1: pass --iters_per_epoch 2" in refused.stderr
            + refused.stdout), refused.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "checkpoint_final.pth"))
    assert _load(os.path.join(out, "checkpoint_latest.pth"))["iteration"] == before["iteration"]
    resumed = run_command(CLI + ["-d", str(DEMO_ID), *TINY, "--epochs", "2", "--decorrelation", "0.5", "--c",
                                 "-o", out], demo["env"])
    # a changed recipe flag is allowed but named; an unchanged one is not
    assert "WARNING: --c: this call changes the recipe" in resumed.stderr, resumed.stderr[-3000:]
    assert "--decorrelation 10.0 -> 0.5" in resumed.stderr and "--lr" not in resumed.stderr
    assert "--encoder_decorrelation" not in resumed.stderr
    newest = max(glob.glob(os.path.join(out, "training_log_*.txt")), key=os.path.getmtime)
    text = open(newest).read()
    assert "Resumed from" in text and "1 epoch(s), 2 iteration(s) done" in text
    assert "checkpoint_latest.pth" in text.split("Resumed from", 1)[1].splitlines()[0]
    assert "Epoch 1" in text and "Epoch 0" not in text
    final = _load(os.path.join(out, "checkpoint_final.pth"))
    assert final["epoch"] == 2 and final["iteration"] == 4
    # Adam's step counters continue (4 = 2 restored + 2 new; a fresh optimizer would say 2)
    steps = {float(s["step"]) for s in final["optimizer_state"]["state"].values()}
    assert steps == {4.0}
    assert {float(s["step"]) for s in before["optimizer_state"]["state"].values()} == {2.0}
    assert len(final["logging"]["epochs"]["loss"]) == 2  # the curves continue too


def test_ddp_two_cpu_processes_gloo(demo, tmp_path):
    out = str(tmp_path / "ddp")
    run_command(CLI + ["-d", str(DEMO_ID), *TINY, "-num_gpus", "2", "--batch_size", "2", "-o", out], demo["env"])
    ckpt = _load(os.path.join(out, "checkpoint_final.pth"))
    assert ckpt["meta"]["world_size"] == 2 and ckpt["iteration"] == 2
    assert len(glob.glob(os.path.join(out, "training_log_*.txt"))) == 1  # rank 0 alone logs
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])  # unwrapped from DDP


# --------------------------------------------------------------------------- in-process API
def _trainer(tmp_path, **kw):
    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer, PretrainOptions
    options = PretrainOptions(dataset=str(DEMO_ID), device="cpu", output_dir=str(tmp_path / "api"),
                              patch_size=[16, 16, 16], **kw)
    t = GeminiPretrainer(options)
    t.build()
    t.case_ids = t.pool_case_ids()
    t.damage_generator = torch.Generator().manual_seed(0)
    return t


def _fixed_pair(t):
    """Two different pool cases, centre 16^3 patches: the same pair every iteration."""
    from nnunet_gemini.pairs import crop_at_relative_position
    from nnunet_gemini.unlabeled import load_pool_dataset, pool_folder_for
    ds = load_pool_dataset(pool_folder_for(t.dataset_name, "nnUNetPlans", "3d_fullres"), t.case_ids[:2])
    a, b = (crop_at_relative_position(ds.load_case(c)[0], (16, 16, 16), (0.5, 0.5, 0.5)) for c in t.case_ids[:2])
    return {"a": torch.from_numpy(a[None].copy()).float(), "b": torch.from_numpy(b[None].copy()).float()}


# Stated margins. Measured on this demo (seed 0, lr 1e-3, patch 16^3, one fixed pair, default
# deformer): over 12 iterations the GEMINI total went 2.65 -> 2.04 (mean of the first 3 vs the
# last 3: -20 %), the restoration MSE 0.53 -> 0.23 (-49 %), NCC 0.10 -> 0.26, folding 0 throughout.
LEARNING_ITERS = 12
GEMINI_DROP = 0.10        # mean GEMINI total of the last 3 iterations <= 90 % of the first 3
RESTORATION_DROP = 0.30   # restoration MSE of the last 3 <= 70 % of the first 3
FOLDING_BOUND = 0.01      # diffeomorphic: at most 1 % of voxels with det(J) <= 0


def test_short_run_learns_on_a_fixed_pair(in_process_env, tmp_path):
    torch.manual_seed(0)
    t = _trainer(tmp_path, lr=1e-3)
    batch = _fixed_pair(t)
    history = [t.train_step(batch) for _ in range(LEARNING_ITERS)]
    first, last = history[:3], history[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "total") <= (1 - GEMINI_DROP) * mean(first, "total"), [r["total"] for r in history]
    assert mean(last, "restoration") <= (1 - RESTORATION_DROP) * mean(first, "restoration"), \
        [r["restoration"] for r in history]
    assert mean(last, "ncc") > mean(first, "ncc")
    assert max(r["folding_fraction"] for r in history) <= FOLDING_BOUND


def test_decorrelation_term_is_logged_always_and_trained_only_with_its_weight(in_process_env, tmp_path):
    """--decorrelation W adds W x decorrelation_loss(features of the pair) to the step's loss; at 0
    (as released) the figure is only logged and the loss is the GEMINI + restoration one."""
    from nnunet_gemini.losses import decorrelation_loss
    losses = {}
    for weight in (0.0, 2.0):
        torch.manual_seed(0)
        t = _trainer(tmp_path / str(weight), restoration=False, decorrelation=weight, encoder_decorrelation=0.0)
        batch = _fixed_pair(t)
        loss, logs = t.model(batch["a"], batch["b"])
        with torch.no_grad():
            expected = decorrelation_loss(t.model.features(torch.cat([batch["a"], batch["b"]])))
        assert float(logs["decorrelation"]) == pytest.approx(float(expected), rel=1e-5)
        assert 0 < float(expected) < 1
        losses[weight] = (float(loss.detach()), float(logs["total"]), float(expected))
        if weight:
            t.optimizer.zero_grad()
            loss.backward()
            encoder = next(p for n, p in t.model.network.named_parameters() if n.startswith("encoder."))
            assert encoder.grad is not None and encoder.grad.abs().sum() > 0
    assert losses[0.0][0] == pytest.approx(losses[0.0][1], rel=1e-6)  # weight 0: not in the loss
    assert losses[2.0][0] == pytest.approx(losses[2.0][1] + 2.0 * losses[2.0][2], rel=1e-5)
    t.log_options()
    assert "decorrelation weight 2, on the encoder 0;" in open(t.logger.log_file).read()


def test_encoder_decorrelation_is_the_mean_over_encoder_stages_and_trains_only_with_its_weight(in_process_env,
                                                                                                tmp_path):
    """--encoder_decorrelation W adds W x the mean decorrelation_loss of the pair's encoder stage outputs;
    at 0 (as released) it is only logged. Its gradient reaches the encoder, not the decoder."""
    from nnunet_gemini.losses import decorrelation_loss
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        t = _trainer(tmp_path / str(weight), restoration=False, decorrelation=0.0, encoder_decorrelation=weight)
        batch = _fixed_pair(t)
        outputs = []
        hooks = [s.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
                 for s in t.model.network.encoder.stages]
        loss, logs = t.model(batch["a"], batch["b"])
        for h in hooks:
            h.remove()
        assert len(outputs) == len(t.model.network.encoder.stages) >= 3
        expected = float(torch.stack([decorrelation_loss(o) for o in outputs]).mean())
        assert float(logs["encoder_decorrelation"]) == pytest.approx(expected, rel=1e-5) and 0 < expected < 1
        rest = float(logs["total"]) + t.options.decorrelation * float(logs["decorrelation"])
        assert float(loss.detach()) == pytest.approx(rest + weight * expected, rel=1e-5)
        if weight:  # the term alone: encoder gradients, none in the decoder
            t.optimizer.zero_grad()
            t.model.gemini = _NoGemini()
            t.model(batch["a"], batch["b"])[0].backward()
            grads = {n: p.grad for n, p in t.model.network.named_parameters() if p.requires_grad}
            assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder."))
            assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("decoder."))
            t.log_options()
            assert "decorrelation weight 0, on the encoder 3;" in open(t.logger.log_file).read()


def test_default_pretraining_decorrelates_the_features_and_the_encoder_stages(in_process_env, tmp_path):
    """gemini_pretrain's defaults are ours, not the released 0: both decorrelation terms in the loss at
    weight 10 (chosen on the real-data selection set, docs/design.md), from the CLI and the API alike."""
    from nnunet_gemini.pretraining.run_pretraining import build_parser, options_from_args
    options = options_from_args(build_parser().parse_args(["-d", "1"]))
    assert (options.decorrelation, options.encoder_decorrelation) == (10.0, 10.0)
    torch.manual_seed(0)
    t = _trainer(tmp_path, restoration=False)
    batch = _fixed_pair(t)
    loss, logs = t.model(batch["a"], batch["b"])
    expected = float(logs["total"]) + 10.0 * float(logs["decorrelation"]) + 10.0 * float(logs["encoder_decorrelation"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) > float(logs["total"]) + 1e-3  # the terms are in the loss, not only logged
    t.log_options()
    assert "decorrelation weight 10, on the encoder 10;" in open(t.logger.log_file).read()


class _NoGemini(torch.nn.Module):
    """A GEMINI step that contributes nothing: isolates the decorrelation terms' gradients."""

    def forward(self, a, b, fa, fb):
        zero = fa.sum() * 0
        return zero, {"total": zero.detach()}


@pytest.mark.parametrize("flag,value", [("--encoder_decorrelation", "-1"), ("--encoder_decorrelation", "inf"),
                                        ("--decorrelation", "nan")])
def test_decorrelation_weights_out_of_range_are_refused(flag, value):
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.pretraining.run_pretraining import build_parser, options_from_args
    args = build_parser().parse_args(["-d", "1", flag, value])
    with pytest.raises(GeminiUserError, match=f"{flag} must be a finite weight >= 0"):
        options_from_args(args)


def test_restoration_weight_scales_only_the_restoration_term(in_process_env, tmp_path):
    """--restoration_weight W: the joint loss is the GEMINI total + W x restoration MSE (released W = 100),
    the separate restoration step is W x MSE, and the weight is in the log line."""
    from nnunet_gemini.choices import PRETRAIN_DEFAULTS
    assert PRETRAIN_DEFAULTS["restoration_weight"] == 100.0
    seen = {}
    for weight in (100.0, 7.0):
        torch.manual_seed(0)
        t = _trainer(tmp_path / str(weight), restoration_weight=weight, decorrelation=0.0, encoder_decorrelation=0.0)
        batch = _fixed_pair(t)
        damaged, target = 0.5 * batch["a"], batch["a"]
        loss, logs = t.model(batch["a"], batch["b"], damaged, target)
        expected = float(logs["total"]) + weight * float(logs["restoration"])
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
        alone, alone_logs = t.model(batch["a"], batch["b"], damaged, target, task="restoration")
        assert float(alone.detach()) == pytest.approx(weight * float(alone_logs["restoration"]), rel=1e-5)
        seen[weight] = float(logs["restoration"])
        t.log_options()
        assert f"restoration joint, weight {weight:g};" in open(t.logger.log_file).read()
    assert seen[100.0] == pytest.approx(seen[7.0], rel=1e-6)  # same network, same MSE: only its weight moved


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_restoration_weight_out_of_range_is_refused(value):
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.pretraining.run_pretraining import build_parser, options_from_args
    args = build_parser().parse_args(["-d", "1", "--restoration_weight", value])
    with pytest.raises(GeminiUserError, match="--restoration_weight must be a finite weight > 0.*--no_restoration"):
        options_from_args(args)


def test_nonfinite_loss_skips_the_update_then_stops(in_process_env, tmp_path, monkeypatch):
    """The shared guard (nnunet_gemini.guarded_step): no backward and no step on a non-finite loss,
    counted and logged; --max_nonfinite in a row stop the run."""
    from nnunet_gemini.errors import GeminiUserError
    monkeypatch.setenv("GEMINI_TEST_NONFINITE_ITERS", "1+")
    t = _trainer(tmp_path, max_nonfinite=2, restoration=False)
    batch = _fixed_pair(t)
    assert t.train_step(batch)  # iteration 0: finite, updated
    params = [p.detach().clone() for p in t.trained_parameters]
    state = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    backward_calls = []
    hooks = [p.register_hook(lambda g: backward_calls.append(1)) for p in t.trained_parameters[:1]]
    assert t.train_step(batch) == {}  # iteration 1: NaN, skipped
    assert backward_calls == []  # no backward ran (the policy of both loops)
    assert all(torch.equal(p, q) for p, q in zip(params, t.trained_parameters))
    assert all(p.grad is None for p in t.trained_parameters)
    assert all(torch.equal(v, t.optimizer.state_dict()["state"][0][k]) for k, v in state.items())
    with pytest.raises(GeminiUserError, match=r"training stopped: 2 non-finite losses in a row \(iterations 1\.\.2; "
                                              r"limit --max_nonfinite=2\)"):
        t.train_step(batch)
    for hook in hooks:
        hook.remove()
    assert t.guarded_step.total == 2 and t.guarded_step.in_a_row == 2
    text = open(t.logger.log_file).read()
    assert "non-finite loss at iteration 1 (epoch 0)" in text and "non-finite loss at iteration 2" in text


# ------------------------------------------------------------------------------ pretrained.py
def test_apply_pretrained_loads_all_but_seg_layers_and_checks_compatibility(in_process_env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_gemini import pretrained
    from nnunet_gemini.checkpoints import network_compatibility_fields
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.heads import build_deformer
    from nnunet_gemini.network import build_segmentation_network

    path = pretrained.find_pretrained_checkpoint(in_process_env["name"], "nnUNetPlans", "3d_fullres")
    assert path == os.path.join(in_process_env["out"], "checkpoint_final.pth")
    assert pretrained.find_pretrained_checkpoint(in_process_env["name"], "nnUNetPlans", "2d") is None
    ckpt = pretrained.load_pretrained_checkpoint(path)
    pm = PlansManager(os.path.join(in_process_env["env"]["nnUNet_preprocessed"], in_process_env["name"],
                                   "nnUNetPlans.json"))
    cm = pm.get_configuration("3d_fullres")
    net = build_segmentation_network(pm, cm, 1, 7)  # other label count: seg layers differ in shape
    deformer = build_deformer(net)
    expected = network_compatibility_fields(pm, cm, 1)
    assert pretrained.apply_pretrained(ckpt, net, deformer, expected) == []
    sd = net.state_dict()
    for k, v in ckpt["network_weights"].items():
        if ".seg_layers." not in k:
            assert torch.equal(sd[k], v), k
    assert all(torch.equal(v, ckpt["deformer_weights"][k]) for k, v in deformer.state_dict().items())

    warnings = pretrained.apply_pretrained(ckpt, net, None, dict(expected, spacing=[1.0, 1.0, 1.0]))
    assert len(warnings) == 1 and "spacing" in warnings[0]
    with pytest.raises(GeminiUserError, match="num_input_channels"):
        pretrained.apply_pretrained(ckpt, net, None, dict(expected, num_input_channels=2))
    with pytest.raises(GeminiUserError, match="normalization_schemes"):
        pretrained.apply_pretrained(ckpt, net, None, dict(expected, normalization_schemes=["CTNormalization"]))


def test_load_pretrained_checkpoint_rejects_other_files(tmp_path):
    from nnunet_gemini import pretrained
    from nnunet_gemini.errors import GeminiUserError
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(GeminiUserError, match="not a readable"):
        pretrained.load_pretrained_checkpoint(str(junk))
    torch.save({"network_weights": {}}, str(tmp_path / "nnunet.pth"))
    with pytest.raises(GeminiUserError, match="not an nnunet-gemini"):
        pretrained.load_pretrained_checkpoint(str(tmp_path / "nnunet.pth"))


def test_cli_errors_are_clear(nnunet_env):
    proc = subprocess.run(CLI + ["-d", "999", "-device", "cpu"], env=nnunet_env, capture_output=True, text=True)
    assert proc.returncode == 2 and "ERROR: dataset '999' not found" in proc.stderr
    proc = subprocess.run(CLI + ["--help"], env=nnunet_env, capture_output=True, text=True)
    assert proc.returncode == 0
    for flag_default in ("--epochs EPOCHS", "(default: 800)", "(default: 250)", "(default: 0.0001)",
                         "(default: diffeomorphic)", "(default: 3d_fullres)", "(default: nnUNetPlans)"):
        assert flag_default in proc.stdout, flag_default


def test_unlabeled_dir_joins_the_pool_incrementally(demo, tmp_path):
    """Pre-train once, fine-tune many: an outside collection joins the pool with the target
    dataset's plans; a second call preprocesses nothing again."""
    collection = tmp_path / "collection"
    collection.mkdir()
    shutil.copy(os.path.join(demo["env"]["nnUNet_raw"], demo["name"], "imagesTs", "GeminiTiny_T000_0000.nii.gz"),
                collection / "outside_0000.nii.gz")
    args = CLI + ["-d", str(DEMO_ID), "--preprocess_only", "-np", "1", "--unlabeled_dir", str(collection)]
    first = run_command(args, demo["env"]).stdout
    assert "(1 preprocessed now, 0 skipped)" in first
    assert "(0 preprocessed now, 0 skipped)" in run_command(args, demo["env"]).stdout
    pool = os.path.join(demo["env"]["nnUNet_preprocessed"], demo["name"], "nnUNetPlans_3d_fullres_gemini_unlabeled")
    sources = {c["case_id"]: c["source"] for c in _load_json(os.path.join(pool, "gemini_pool.json"))["cases"]}
    assert sources["outside"] == f"unlabeled_dir:{collection}"


def test_deformer_lr_is_a_group_of_its_own_and_old_one_group_states_resume(in_process_env, tmp_path):
    """--deformer_lr: the deformer's parameters (and only they) train at their own Adam lr; a
    checkpoint whose optimiser state has one group (before --deformer_lr) resumes with its moments."""
    from nnunet_gemini.checkpoints import optimizer_state_regrouped
    t = _trainer(tmp_path, lr=1e-4, deformer_lr=1e-3)
    network_group, deformer_group = t.optimizer.param_groups
    assert (network_group["lr"], deformer_group["lr"]) == (1e-4, 1e-3)
    assert {id(p) for p in deformer_group["params"]} == {id(p) for p in t.model.gemini.deformer.parameters()}
    assert len(network_group["params"]) + len(deformer_group["params"]) == len(t.trained_parameters)
    assert [g["lr"] for g in _trainer(tmp_path / "default").optimizer.param_groups] == [1e-4, 1e-4]
    batch = _fixed_pair(t)
    assert t.train_step(batch)
    # the same moments as a one-group Adam over trained_parameters saves them: back to the two groups
    position = {id(p): i for i, p in enumerate(t.trained_parameters)}
    two = t.optimizer.state_dict()
    ids = [p for g in t.optimizer.param_groups for p in g["params"]]
    one = {"state": {position[id(p)]: two["state"][k] for k, p in enumerate(ids) if k in two["state"]},
           "param_groups": [dict(two["param_groups"][0], params=list(range(len(ids))))]}
    back = optimizer_state_regrouped(one, t.group_positions)
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in two["param_groups"]]
    assert back["state"].keys() == two["state"].keys()
    assert all(torch.equal(back["state"][k]["exp_avg"], two["state"][k]["exp_avg"]) for k in two["state"])
    with pytest.raises(ValueError):
        optimizer_state_regrouped(one, [t.group_positions[0]])  # the deformer's parameters left out
    # through --c: a checkpoint holding the one-group state resumes, lrs of the call, moments kept
    ckpt = t.checkpoint_dict()
    ckpt["optimizer_state"] = one
    torch.save(ckpt, os.path.join(t.output_dir, "checkpoint_latest.pth"))
    r = _trainer(tmp_path, lr=1e-4, deformer_lr=5e-4)
    assert r.resume()
    assert [g["lr"] for g in r.optimizer.param_groups] == [1e-4, 5e-4]
    restored = r.optimizer.state_dict()["state"]
    assert all(torch.equal(restored[k]["exp_avg"], two["state"][k]["exp_avg"]) for k in two["state"])


def test_deformer_input_is_built_checkpointed_and_held_on_resume(in_process_env, tmp_path):
    """--deformer_input images: the deformer sees the two images (one channel each), trains, draws its
    example, and the checkpoint records the input; --c with another input is refused naming the flag."""
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.gemini_step import spec_from_checkpoint
    t = _trainer(tmp_path, deformer_input="images")
    assert t.model.gemini.deformer.enc0[0].in_channels == 2 * t.num_input_channels
    batch = _fixed_pair(t)
    before = [p.detach().clone() for p in t.model.gemini.deformer.parameters()]
    assert t.train_step(batch)
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.gemini.deformer.parameters()))
    t.epoch = 1
    t.save_examples(batch)  # draws the pair's field: the deformer needs the images there too
    assert glob.glob(os.path.join(t.output_dir, "example_pair_epoch_0001.png"))
    ckpt = t.checkpoint_dict()
    assert spec_from_checkpoint(ckpt["meta"], "ckpt")["input"] == "images"
    torch.save(ckpt, os.path.join(t.output_dir, "checkpoint_latest.pth"))
    assert _trainer(tmp_path, deformer_input="images").resume()
    with pytest.raises(GeminiUserError, match="sees the images, not the features: pass --deformer_input images"):
        _trainer(tmp_path).resume()
