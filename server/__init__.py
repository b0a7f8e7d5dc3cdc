"""snnet-serve: the HTTP service around one SN-Net checkpoint."""
