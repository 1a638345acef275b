"""Training states (ditq.train.resume): optimizer states by position or by name, and states written
by earlier versions still resume."""

import torch

from ditq.train.checkpoint import load_state


def test_optimizer_states_convert_between_positions_and_names():
    from ditq.train.resume import _opt_state_as

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    names = [n for n, _ in net.named_parameters()]
    by_name = _opt_state_as(opt.state_dict(), "positions", "names", names)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    back = _opt_state_as(by_name, "names", "positions", names)
    assert list(back["state"]) == [0, 1, 2, 3]
    torch.optim.AdamW(net.parameters()).load_state_dict(back)


def test_states_written_before_distributed_training_still_resume(tmp_path):
    # The old single-process state: a timestep-generator state under "rng", no "opt_format",
    # no per-rank RNG states. It resumes (with the per-step noise of this version).
    from ditq.models import create_model
    from ditq.train.checkpoint import SingleFileState, save_state
    from ditq.train.loop import TrainConfig, fit

    def model():
        torch.manual_seed(0)
        return create_model(
            "DiT-S/4", input_size=8, in_channels=1, num_classes=2, depth=1, hidden_size=32, num_heads=2
        )

    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6) % 2
    store = SingleFileState(tmp_path / "state.pt")
    fit(model(), (x, y), TrainConfig(steps=2, batch_size=2, log_every=1), store=store)
    state = load_state(store.path)
    del state["opt_format"], state["rng_ranks"]
    state["rng"] = torch.Generator().get_state()
    save_state(store.path, state)
    result = fit(model(), (x, y), TrainConfig(steps=3, batch_size=2, log_every=1), store=store, resume=True)
    assert result.start_step == 2 and [r["step"] for r in result.records] == [3]
