"""The colours of medpipe's figures: the Okabe-Ito palette, which reads the same with the common
colour-vision deficiencies (red-green above all), plus a sequential map of the same family.

Okabe M., Ito K. (2008), "Color Universal Design: how to make figures and presentations that are
friendly to colorblind people". Pictures never rely on colour alone: truth and prediction are also told
apart by line style (solid / dashed), and every colour is named in the legend or title.
"""

from __future__ import annotations

#: the eight Okabe-Ito colours (hex)
BLACK = "#000000"
ORANGE = "#E69F00"
SKY_BLUE = "#56B4E9"
BLUISH_GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
REDDISH_PURPLE = "#CC79A7"

#: a cycle of distinguishable line colours on a white background (yellow is too faint there)
CYCLE = (BLUE, VERMILLION, BLUISH_GREEN, REDDISH_PURPLE, ORANGE, SKY_BLUE, BLACK)
#: line styles cycled with the colours, so that more lines than colours stay distinguishable
LINESTYLES = ("-", "--", "-.", ":")

#: segmentation outlines over grey images: light colours that show on dark tissue, drawn over a black
#: halo so they also show on bright tissue; truth solid, prediction dashed
TRUTH = SKY_BLUE
PREDICTION = ORANGE
TRUTH_NAME = "sky blue, solid"
PREDICTION_NAME = "orange, dashed"

#: sequential colour map for heat maps (explanations): perceptually uniform and colour-blind safe
HEATMAP = "cividis"


def cycle(k: int) -> tuple[str, str]:
    """The ``k``-th (colour, line style) pair; the style changes each time the colours repeat."""
    return CYCLE[k % len(CYCLE)], LINESTYLES[(k // len(CYCLE)) % len(LINESTYLES)]
