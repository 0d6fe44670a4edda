"""What both detector engines share, with no mxnet and no gluoncv: the VOC/COCO readers, the lr schedule,
the checkpoint layout and progress, and the scoring (VOC07/VOC12 in numpy, COCO with pycocotools)."""
