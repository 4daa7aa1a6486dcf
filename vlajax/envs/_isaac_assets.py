"""Build a local Franka Panda USD for Isaac Lab from robosuite's Panda MJCF and meshes.

Why: Isaac Lab's stock tasks load their robot from NVIDIA's asset server, which machines without
internet cannot reach. robosuite (a LIBERO dependency) ships the Panda arm and gripper as MJCF with
meshes; renamed to Isaac Lab's Franka names (panda_link0..7, panda_hand, panda_leftfinger,
panda_rightfinger, panda_joint1..7, panda_finger_joint1/2) and converted with NVIDIA's
`mujoco-usd-converter`, it loads in the Franka tasks in place of the stock USD (same
/panda/Geometry/panda_link0/.../panda_hand prim layout). Differences from the stock asset: robosuite's
inertias and collision meshes, no joint drives (the env sets the actuator gains) and no finger mimic
joint (both finger joints are driven, opening towards +0.04 m).

Runs in the Isaac Lab interpreter, which needs `pip install mujoco-usd-converter==0.6.1` (the
release for mujoco 3.12, Isaac Lab 3.0's pin):
    <isaac python> _isaac_assets.py --robosuite-assets DIR --out DIR
It imports neither vlajax nor jax; `vlajax.envs.isaac.build_local_franka_usd` runs it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

FINGERS = {"leftfinger": "panda_leftfinger", "rightfinger": "panda_rightfinger"}
FINGER_JOINTS = {"finger_joint1": "panda_finger_joint1", "finger_joint2": "panda_finger_joint2"}


def _qmul(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _qrot(q, v):
    return _qmul(_qmul(q, np.r_[0.0, v]), q * np.array([1.0, -1.0, -1.0, -1.0]))[1:]


def _vec(s: str) -> np.ndarray:
    return np.array([float(x) for x in s.split()])


def _fmt(a) -> str:
    return " ".join(f"{x:.6g}" for x in a)


def panda_mjcf(robosuite_assets: Path) -> ET.Element:
    """One MJCF (arm + gripper, fixed base, no actuators) with Isaac Lab's Franka names.

    The gripper body of robosuite ("right_gripper", rotated -90 deg about z under the arm's
    "right_hand") is folded into "panda_hand", which keeps the hand frame of the arm MJCF (7th link
    + 0.1065 m, -45 deg about z: the URDF's panda_hand up to 0.5 mm)."""
    arm_dir, grip_dir = robosuite_assets / "robots" / "panda", robosuite_assets / "grippers"
    robot = ET.parse(arm_dir / "robot.xml").getroot()
    grip = ET.parse(grip_dir / "panda_gripper.xml").getroot()

    asset = ET.Element("asset")
    for src, base in ((robot, arm_dir), (grip, grip_dir)):
        for a in src.find("asset"):
            a = copy.deepcopy(a)
            if a.get("file"):
                a.set("file", str(base / a.get("file")))
            asset.append(a)

    link0 = copy.deepcopy(robot.find("worldbody").find("body").find("body"))  # base -> link0
    for b in link0.iter("body"):
        if b.get("name", "").startswith("link"):
            b.set("name", "panda_" + b.get("name"))
        for c in list(b):
            if c.tag == "camera":
                b.remove(c)
        for j in b.findall("joint"):
            j.set("name", "panda_" + j.get("name"))
    hand = next(b for b in link0.iter("body") if b.get("name") == "right_hand")
    hand.set("name", "panda_hand")

    rg = grip.find("worldbody").find("body")
    qg, pg = _vec(rg.get("quat")), _vec(rg.get("pos"))
    for c in rg:
        if c.tag in ("site", "inertial") or (c.tag == "body" and c.get("name") not in FINGERS):
            continue  # visual sites, the "eef" marker body, a placeholder inertial (see below)
        c = copy.deepcopy(c)
        c.set("pos", _fmt(pg + _qrot(qg, _vec(c.get("pos", "0 0 0")))))
        c.set("quat", _fmt(_qmul(qg, _vec(c.get("quat", "1 0 0 0")))))
        if c.tag == "body":
            name = FINGERS[c.get("name")]
            c.set("name", name)
            for j in c.findall("joint"):
                j.set("name", FINGER_JOINTS[j.get("name")])
                if j.get("name") == "panda_finger_joint2":  # Isaac: both fingers open towards +0.04
                    j.set("axis", "0 -1 0")
                    j.set("range", "0 0.04")
            for tip in c.iter("body"):
                if tip is not c:
                    tip.set("name", name + "_tip")
        hand.append(c)
    for g in link0.iter("geom"):
        g.attrib.pop("name", None)
    # robosuite's inertials are placeholders (0.3 kg m^2 for a 3 kg link) that make the arm sluggish
    # under joint PD control: drop them, so mass and inertia come from the colliders (density 1000).
    # panda_link7 has no collider: it keeps its 0.5 kg with a plausible inertia.
    for b in link0.iter("body"):
        for inertial in b.findall("inertial"):
            if b.get("name") == "panda_link7":
                inertial.set("diaginertia", "0.001 0.001 0.001")
            else:
                b.remove(inertial)

    root = ET.Element("mujoco", model="panda")
    ET.SubElement(root, "compiler", angle="radian", inertiagrouprange="0 0")
    root.append(asset)
    ET.SubElement(root, "worldbody").append(link0)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="robosuite Panda MJCF -> Isaac Lab Franka USD")
    p.add_argument("--robosuite-assets", required=True, help="robosuite/models/assets")
    p.add_argument("--out", required=True, help="output folder; the USD is <out>/panda.usda")
    args = p.parse_args(argv)
    from mujoco_usd_converter import Converter  # Isaac venv: pip install mujoco-usd-converter==0.6.1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mjcf = out / "panda.xml"
    ET.ElementTree(panda_mjcf(Path(args.robosuite_assets))).write(mjcf)
    usd = Converter(scene=False).convert(str(mjcf), str(out))
    print(usd.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
