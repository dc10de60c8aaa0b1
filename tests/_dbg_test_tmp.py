import sys; sys.path.insert(0,'/work/main/tests')
from test_unlabeled import planned_root, env_root, _bad_inputs, raw, DATASET, unlabeled, os
def test_dbg(env_root):
    _bad_inputs(env_root)
    print(sorted(os.listdir(raw(env_root, "imagesUnlabeled"))))
    s = unlabeled.preprocess_pool(DATASET)
    print(s)
