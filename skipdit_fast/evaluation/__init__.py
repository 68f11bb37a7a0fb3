"""Scoring generated samples: metrics (Frechet distance, PSNR, SSIM) and the digit
classifier of the shipped models. Layer: above data and pretrained (the classifier's
weights ship beside the models'), below the applications and benchmarks."""
