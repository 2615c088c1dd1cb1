variable "prefix" {
  description = "Bucket names are \"<prefix>-<name>\" (S3 names are global: pick a prefix of your own, e.g. \"acme-resnet\")."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,40}[a-z0-9]$", var.prefix))
    error_message = "prefix: 3-42 lowercase letters, digits and hyphens, starting and ending with a letter or digit."
  }
}

variable "buckets" {
  description = "The buckets to create, by short name: data (prepared datasets), dvc (DVC remote), mlflow (MLflow artifacts), ray (Ray Train/Tune storage_path)."
  type        = set(string)
  default     = ["data", "dvc", "mlflow", "ray"]
}

variable "expiration_days" {
  description = "Current objects expire after this many days, per bucket short name (absent or 0: never). Ray checkpoints are reproducible by re-running the stage, so they expire by default."
  type        = map(number)
  default     = { ray = 30 }

  validation {
    condition     = alltrue([for days in values(var.expiration_days) : days >= 0 && floor(days) == days])
    error_message = "expiration_days: whole numbers of days, 0 for never."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Overwritten or deleted object versions are kept this many days (versioning is on: this is the undo window)."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Parts of multipart uploads that never completed are deleted after this many days."
  type        = number
  default     = 7

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1
    error_message = "abort_incomplete_multipart_upload_days must be at least 1."
  }
}

variable "kms_key_arn" {
  description = "A KMS key for SSE-KMS default encryption; null (the default) means SSE-S3 (AES256, no KMS request costs)."
  type        = string
  default     = null
}

variable "enable_public_access_block" {
  description = "Block every form of public access. Keep true on AWS; false only for S3-compatible servers without the PublicAccessBlock API (SeaweedFS answers 501)."
  type        = bool
  default     = true
}

variable "enforce_tls" {
  description = "A bucket policy denying any request not made over TLS. Keep true on AWS; false only for local servers reached over plain HTTP (there the policy locks the bucket completely)."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete buckets that still hold objects (and every version of them)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags on every bucket."
  type        = map(string)
  default     = {}
}
