# S3 buckets for the pipeline: one per role (data, dvc, mlflow, ray), all with the same protections.
# Versioned, encrypted at rest by default (SSE-S3, or SSE-KMS with var.kms_key_arn), ACLs disabled,
# public access blocked, TLS-only, and a lifecycle that bounds what versioning keeps.

data "aws_partition" "current" {}

locals {
  names = { for name in var.buckets : name => "${var.prefix}-${name}" }
  # Built from the names (not read back from the buckets) so that policies are known at plan time.
  arns = { for name, bucket in local.names : name => "arn:${data.aws_partition.current.partition}:s3:::${bucket}" }
  kms  = var.kms_key_arn != null
}

resource "aws_s3_bucket" "this" {
  for_each = local.names

  # Skips, with reasons (checkov reads these comments; see also ../../.checkov.yaml):
  #checkov:skip=CKV_AWS_18:Server access logging needs a separate log bucket and costs per request; enable it in your account's logging setup if required.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost; everything here is reproducible (DVC, re-runnable stages) or already versioned.
  #checkov:skip=CKV2_AWS_62:No consumer of S3 event notifications exists in this pipeline.
  #checkov:skip=CKV_AWS_145:SSE-S3 is the default by design (no KMS request costs); SSE-KMS is one variable away (kms_key_arn).
  bucket        = each.value
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { "resnet-pipeline/bucket" = each.key })
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced" # ACLs off: the bucket owner owns every object
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = var.enable_public_access_block ? aws_s3_bucket.this : {}

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = local.kms ? "aws:kms" : "AES256"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = local.kms # S3 Bucket Keys cut KMS requests (and their cost) by orders of magnitude
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  dynamic "rule" {
    for_each = lookup(var.expiration_days, each.key, 0) > 0 ? [lookup(var.expiration_days, each.key, 0)] : []
    content {
      id     = "expire-current-objects"
      status = "Enabled"
      filter {}
      expiration {
        days = rule.value
      }
    }
  }

  # Lifecycle rules act on versions: versioning must be configured first.
  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "tls_only" {
  # Over the names, not the bucket resources: the document is then known at plan time (and shows in the plan).
  for_each = var.enforce_tls ? local.names : {}

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.arns[each.key], "${local.arns[each.key]}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyTlsOlderThan12"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.arns[each.key], "${local.arns[each.key]}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  for_each = data.aws_iam_policy_document.tls_only

  bucket = aws_s3_bucket.this[each.key].id
  policy = each.value.json

  # A policy naming public principals is refused while the block is being created: apply it after.
  depends_on = [aws_s3_bucket_public_access_block.this]
}
