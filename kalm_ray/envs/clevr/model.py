"""The CLEVR-Robot MuJoCo model (MJCF written here, compiled with the ``mujoco`` bindings).

Every number below is a fact of the reference environment (``ENVS_SPEC.md``); the
push distances the tests check depend on them closely (joint armature, ball damping
and density, a ``motor`` actuator, the pusher geom at its body origin).

Collision bits (MuJoCo collides two geoms when ``contype_a & conaffinity_b`` or
``contype_b & conaffinity_a`` is non-zero):

=======  =======  ===========  ==========================================
geom     contype  conaffinity  collides with
=======  =======  ===========  ==========================================
ball     1        3            balls, table, walls, pusher
table    1        1            balls (the pusher never reaches it)
wall     2        0            balls only
pusher   4        1            balls only (not walls: 4&0 == 0, 2&1 == 0)
=======  =======  ===========  ==========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mujoco

COLORS: tuple[str, ...] = ("red", "blue", "green", "purple", "cyan")
"""Ball colours by index; the observation lists ball (x, y) in this order."""

BALL_RADIUS = 0.13
TABLE_Z = -0.325
BALL_Z = TABLE_Z + BALL_RADIUS  # -0.195: a resting ball's centre height
PUSHER_Z = -0.2
PUSHER_RADIUS = 0.05
WALL_X = 0.6
"""Walls at x = -WALL_X and x = +WALL_X."""
WALL_Y_LOW = -0.3
WALL_Y_HIGH = 0.7

_RGBA = {
    "red": "0.87 0.16 0.16 1",
    "blue": "0.16 0.32 0.87 1",
    "green": "0.16 0.70 0.25 1",
    "purple": "0.55 0.22 0.75 1",
    "cyan": "0.16 0.80 0.85 1",
}

# Walls: a plane is the half-space below its local z axis, so each wall's zaxis points
# into the arena. rgba alpha 0 keeps them invisible in renders.
_WALLS = (
    ("wall_left", f"{-WALL_X} 0 0", "1 0 0"),
    ("wall_right", f"{WALL_X} 0 0", "-1 0 0"),
    ("wall_front", f"0 {WALL_Y_LOW} 0", "0 1 0"),
    ("wall_back", f"0 {WALL_Y_HIGH} 0", "0 -1 0"),
)


def build_xml() -> str:
    """The MJCF text of the scene: 5 balls, table, 4 invisible walls, a 2-DoF pusher."""
    balls = "\n".join(
        f"""    <body name="{c}" pos="{-0.4 + 0.2 * i:.3f} 0 {BALL_Z}">
      <joint name="{c}_free" type="free" damping="0.75"/>
      <geom name="{c}_geom" type="sphere" size="{BALL_RADIUS}" density="1"
            contype="1" conaffinity="3" rgba="{_RGBA[c]}"/>
    </body>"""
        for i, c in enumerate(COLORS)
    )
    walls = "\n".join(
        f'    <geom name="{n}" type="plane" pos="{p}" zaxis="{z}" size="1 1 0.1" '
        f'contype="2" conaffinity="0" rgba="0 0 0 0"/>'
        for n, p, z in _WALLS
    )
    return f"""<mujoco model="clevr_robot">
  <compiler angle="radian"/>
  <option timestep="0.01" integrator="Euler" gravity="0 0 -9.81" iterations="20"/>
  <default>
    <joint armature="0.04" damping="1"/>
    <geom friction="0.8 0.1 0.1" margin="0.002" condim="3"/>
  </default>
  <visual>
    <global offwidth="640" offheight="480"/>
  </visual>
  <worldbody>
    <light pos="0 0.2 2" dir="0 0 -1" directional="true" diffuse="0.6 0.6 0.6"/>
    <camera name="top" pos="0 0.2 1.6" xyaxes="1 0 0 0 1 0"/>
    <geom name="table" type="plane" pos="0 0 {TABLE_Z}" size="1.2 1.2 0.1"
          contype="1" conaffinity="1" rgba="0.75 0.75 0.75 1"/>
{walls}
{balls}
    <body name="pusher" pos="0 0 {PUSHER_Z}">
      <joint name="pusher_x" type="slide" axis="1 0 0" pos="0 0 0" damping="0.5"/>
      <joint name="pusher_y" type="slide" axis="0 1 0" pos="0 0 0" damping="0.5"/>
      <geom name="pusher_geom" type="sphere" size="{PUSHER_RADIUS}" pos="0 0 0" density="0.5"
            contype="4" conaffinity="1" rgba="0.3 0.3 0.3 1"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="push_x" joint="pusher_x" gear="1" ctrllimited="true" ctrlrange="-2 2"/>
    <motor name="push_y" joint="pusher_y" gear="1" ctrllimited="true" ctrlrange="-2 2"/>
  </actuator>
</mujoco>
"""


def build_model() -> mujoco.MjModel:
    """Compile the scene; imports MuJoCo only when called (keeps suite import light)."""
    import mujoco

    return mujoco.MjModel.from_xml_string(build_xml())
