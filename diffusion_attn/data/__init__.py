"""The shapes world (a procedural, seedable generator of coloured-shape images and videos with captions and
exact ground truth) and a scorer for it with no learned weights."""

from .scorer import (Detection, Score, aggregate, box_iou, detect, image_metrics, motion_direction,
                     score_image, score_video, segment)
from .shapes import (BACKGROUNDS, MOTIONS, PALETTE, POSITIONS, SHAPES, ObjectSpec, ParsedCaption, Sample,
                     ShapeObject, caption_for, generate_image, generate_images, generate_video, parse_caption,
                     position_word, spec_phrase)

__all__ = ["BACKGROUNDS", "MOTIONS", "PALETTE", "POSITIONS", "SHAPES", "Detection", "ObjectSpec", "ParsedCaption",
           "Sample", "Score", "ShapeObject", "aggregate", "box_iou", "caption_for", "detect", "generate_image",
           "generate_images", "generate_video", "image_metrics", "motion_direction", "parse_caption",
           "position_word", "score_image", "score_video", "segment", "spec_phrase"]
