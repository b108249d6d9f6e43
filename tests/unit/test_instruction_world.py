"""The instruction task's world: the instruction decides which object moves where; held-out
colour-direction pairs never in training; the grammar parses back; the success estimator of the
evaluation finds the ground truth a success and a wrong video a failure; the simulator follows any
instruction."""

from __future__ import annotations

import numpy as np

from nemo_ext.tasks.instruction import world as iw
from nemo_ext.tasks.instruction.evaluation import judge, object_centre
from nemo_ext.worlds import WorldSpec, render_episode

SPEC = WorldSpec(num_frames=9, height=64, width=64, fps=8)


def test_train_split_never_commands_a_held_out_pair_and_the_held_out_split_does():
    train = [render_episode("instruction", 0, i, SPEC) for i in range(40)]
    held = [render_episode("instruction", 1, i, SPEC, held_out=True) for i in range(40)]
    pair = lambda ep: (ep.meta["command"]["color"], ep.meta["command"]["direction"])  # noqa: E731
    assert not any(pair(ep) in iw.HELD_OUT_PAIRS for ep in train)
    unseen = [ep for ep in held if pair(ep) in iw.HELD_OUT_PAIRS]
    assert 10 <= len(unseen) <= 20 and all(ep.meta["held_out_pair"] for ep in unseen)
    # deterministic: the same (seed, index) renders the same bytes
    again = render_episode("instruction", 0, 3, SPEC)
    assert np.array_equal(again.frames, train[3].frames) and again.caption == train[3].caption


def test_grammar_paraphrases_parse_back_and_only_the_named_object_moves():
    for i in range(20):
        ep = render_episode("instruction", 0, i, SPEC)
        cmd = ep.meta["command"]
        assert len(ep.meta["instructions"]) == iw.PARAPHRASES and ep.caption == ep.meta["instructions"][0]
        assert all(iw.parse_instruction(t) == (cmd["color"], cmd["direction"]) for t in ep.meta["instructions"])
        for k, obj in enumerate(ep.meta["objects"]):
            moved = obj["end"] != obj["position"]
            assert moved == (k == ep.meta["target"])
            first = object_centre(ep.frames[0], obj["rgb"])
            # found where the json says (a triangle's centroid sits a third of its size below its centre)
            assert first is not None and np.hypot(first[0] - obj["position"][0], first[1] - obj["position"][1]) < \
                obj["size"] / 3 + 1.0
    assert iw.parse_instruction("do a barrel roll") is None


def test_the_success_estimator_and_the_simulator():
    for i in range(12):
        ep = render_episode("instruction", 1, i, SPEC, held_out=True)
        assert judge(ep.frames, ep.meta, (1.0, 1.0))["success"], ep.meta["command"]
        held = np.repeat(ep.frames[:1], SPEC.num_frames, axis=0)  # nothing moves
        result = judge(held, ep.meta, (1.0, 1.0))
        assert not result["success"] and result["observed"] == "none"
        # the simulator under another instruction for the same colour: the object goes that way (the one
        # with the most room; it stops at the border)
        cmd = ep.meta["command"]
        obj = ep.meta["objects"][ep.meta["target"]]
        (x, y), s = obj["position"], obj["size"]
        room = {"left": x - s, "right": SPEC.width - s - x, "up": y - s, "down": SPEC.height - s - y}
        other = max((d for d in room if d != cmd["direction"]), key=room.get)
        frames, scene = iw.render_instruction_episode(SPEC, 1, i, held_out=True,
                                                      instruction=f"move the {cmd['color']} object {other}")
        assert scene["command"] == cmd and judge(frames, ep.meta, (1.0, 1.0))["observed"] == other
        nothing, _ = iw.render_instruction_episode(SPEC, 1, i, True, instruction="wave at the camera")
        assert np.array_equal(nothing[-1], nothing[0])
