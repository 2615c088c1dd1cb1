# The pipeline's AWS side: S3 buckets (modules/buckets), scoped IAM roles and instance profiles for the Ray head
# and workers (iam.tf), and the cluster's security group (network.tf). The Ray cluster itself is started by
# `ray up ../cluster.yaml`, which uses the instance profiles and security group by name.

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {
  count = var.account_id == null ? 1 : 0
}

locals {
  partition  = data.aws_partition.current.partition
  account_id = var.account_id != null ? var.account_id : data.aws_caller_identity.current[0].account_id
}

module "buckets" {
  source = "./modules/buckets"

  prefix                             = var.prefix
  buckets                            = ["data", "dvc", "mlflow", "ray"]
  expiration_days                    = { ray = var.ray_checkpoint_expiration_days }
  noncurrent_version_expiration_days = var.noncurrent_version_expiration_days
  kms_key_arn                        = var.kms_key_arn
  force_destroy                      = var.force_destroy
  # On AWS both protections stay on (the module's defaults); they exist as switches for local S3 servers only.
  enable_public_access_block = true
  enforce_tls                = true
}
