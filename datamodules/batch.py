"""The batch contract shared by every DataModule and every LightningModule.

A training or evaluation batch is a ``dict``. Networks never see it; LightningModules unpack it.
Keys (B = batch size, K = number of classes, H, W = the transformed image size):

``image``            float (B, C, H, W), or (B, C, D, H, W) for volumes. The student view.
``image_teacher``    float, same shape and **same geometry** as ``image``, with its own photometric
                     draw. Present only when the DataModule is built with ``two_views=True``.
                     Geometry is shared, so attention maps of the two views align pixel for pixel.
``labels``           float (B, K). Multi-hot targets (multilabel) or one-hot (multiclass).
``label_mask``       bool (B, K). True where a label is known and enters a supervised loss: False for
                     CheXpert U-Ignore / blank-as-ignore entries and for every class of an unlabeled image.
``stream``           long (B,). Which supervision stream the image came from: ``STREAM_BOX`` (boxes and
                     labels), ``STREAM_LABEL`` (image labels only) or ``STREAM_UNLABELED`` (nothing).
``boxes``            list of B float tensors (N_i, 4), ``xyxy`` in pixels of the *transformed* image
                     (x = column, y = row). Empty (0, 4) when an image has none.
``box_labels``       list of B long tensors (N_i,), class indices into ``class_names``.
``has_boxes``        bool (B,). True for images whose box annotation is complete (the box stream).
``mask``             float (B, 1, H, W) in {0, 1}: the organ mask (lungs), zeros if absent.
``attention_mask``   float (B, 1, H, W) in {0, 1}: where attention should go (lesion masks, or the organ
                     mask when a dataset has no lesion masks), zeros if absent.
``has_mask``         bool (B,). Whether ``mask`` is real for that image.
``has_attention_mask`` bool (B,). Whether ``attention_mask`` is real for that image.
``frame``            float (B, 3): (original height, original width, scale). The transformed image is the
                     original resized by ``scale`` and padded at the bottom/right, so
                     ``datamodules.transforms.to_original_frame`` maps heatmaps back.
``image_id``         list of B str. ``patient_id``: list of B str.

Segmentation batches (volumes) use ``image`` and ``label_map`` (long (B, 1, *spatial)).
"""

from __future__ import annotations

STREAM_BOX = 0
STREAM_LABEL = 1
STREAM_UNLABELED = 2
STREAM_NAMES = {STREAM_BOX: "box", STREAM_LABEL: "label", STREAM_UNLABELED: "unlabeled"}

__all__ = ["STREAM_BOX", "STREAM_LABEL", "STREAM_UNLABELED", "STREAM_NAMES"]
