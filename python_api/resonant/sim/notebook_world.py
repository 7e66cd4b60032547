"""The tree world of the "Developing Spatial Memory" notebook, as its printout lists it.

The notebook draws its world once (unseeded) and prints every tree: a person's name, a fruit and
a 2-D location in metres. NOTEBOOK_TREES is that printout transcribed, in the printed order
(which is also the tree id order). A tree is poisonous exactly when its fruit is one of
POISONOUS_FRUITS (the notebook's drive classifier is trained with that split).

Two published numbers pin this table down and are checked by the tests: the tree closest to the
origin is Homer (papaya) at 23.07 m, and the smallest grid read error of the pruning section,
2.1720796209291453e-15 at the grid corner (500, 500), is the sensor reading there, where only
Rachel's cherry tree (388 m away) contributes: 10^(−3.883²) × ‖tree vector‖, which makes that
tree vector about 2.6 long (see embeddings.tree_vectors).
"""
from __future__ import annotations

# (name, fruit, x in m, y in m), as printed (float32 values written out in full)
NOTEBOOK_TREES = (
    ("Winston", "pear", -363.0957946777344, -10.466400146484375),
    ("Kramer", "banana", 311.3721923828125, -214.82005310058594),
    ("Peter", "date", -241.35983276367188, 291.2801208496094),
    ("Rupert", "papaya", 166.30374145507812, -285.3287658691406),
    ("Julia", "elderberry", 338.356689453125, 34.61469650268555),
    ("Homer", "cherry", 33.31411361694336, 290.41046142578125),
    ("Richard", "strychnine fruit", -424.9556884765625, -314.7217102050781),
    ("Abigail", "strychnine fruit", 252.83644104003906, -77.73773956298828),
    ("Rachel", "pear", 182.71652221679688, -13.932559967041016),
    ("Homer", "papaya", -23.01750373840332, 1.541074514389038),
    ("Rupert", "strychnine fruit", -126.63072204589844, -318.89959716796875),
    ("Ursula", "strychnine fruit", -56.491607666015625, -225.31246948242188),
    ("Kamala", "orange", 168.79798889160156, -29.354480743408203),
    ("Clinton", "pear", 28.278409957885742, -41.138980865478516),
    ("Kamala", "strychnine fruit", 106.21846008300781, 55.16600799560547),
    ("George", "nightshade", -228.00747680664062, 131.72265625),
    ("Florence", "mango", -360.0386047363281, 41.14054489135742),
    ("Wendy", "nightshade", -29.32383155822754, 101.1414794921875),
    ("Sam", "apple", -387.7786865234375, 49.98896026611328),
    ("Elizabeth", "manchineel", -136.2073516845703, -71.43858337402344),
    ("Toby", "cherry", 163.6121826171875, -25.735822677612305),
    ("Rachel", "cherry", 378.7822265625, 131.08822631835938),
    ("Winston", "banana", -110.94941711425781, 199.56362915039062),
    ("Jane", "manchineel", -143.9712677001953, -337.9956359863281),
    ("Yogi", "apple", 187.3199005126953, 215.32290649414062),
)

# the notebook's printed closest tree to the origin and its distance
CLOSEST_TO_ORIGIN = ("Homer", "papaya", 23.07)
# the smallest grid read error vs the sensor it printed (at the grid corner (500, 500))
CORNER_SENSOR_NORM = 2.1720796209291453e-15
