"""The metric conventions ``evaluate`` offers, by name: importable without torch, so the CLI starts cheap."""

CONVENTIONS = {
    "radiodiff": "maps in [0, 1]; data range from each map: PSNR max − min of the target, SSIM the larger "
                 "of the two maps' max − min; SSIM over the valid region (RadioDiff's sample_cond_ldm.py "
                 "with torchmetrics ≤ 1.4)",
    "fixed": "maps in [0, 1]; data range 1 (the full scale) for PSNR and SSIM; SSIM over the whole map "
             "(torchmetrics as installed; this package's validation metrics)",
}
"""Name → the data range it uses, as the output states it."""
