variable "region" {
  description = "AWS region of the buckets and the Ray cluster (cluster.yaml's provider.region must be the same)."
  type        = string
  default     = "us-west-2"
}

variable "prefix" {
  description = "Bucket names are \"<prefix>-data\", \"-dvc\", \"-mlflow\", \"-ray\". S3 names are global: use your own, e.g. \"acme-resnet\"."
  type        = string
}

variable "cluster_name" {
  description = "The Ray cluster's name: cluster.yaml's cluster_name. Names the IAM roles, instance profiles and security group, and scopes what the head may do to EC2 instances (the launcher tags them ray-cluster-name=<cluster_name>)."
  type        = string
  default     = "resnet-pipeline"

  validation {
    condition     = can(regex("^[a-zA-Z0-9][a-zA-Z0-9-]{0,40}$", var.cluster_name))
    error_message = "cluster_name: up to 41 letters, digits and hyphens."
  }
}

variable "account_id" {
  description = "The AWS account id, to write exact ARNs into the policies; null (the default) looks it up with the caller's credentials."
  type        = string
  default     = null

  validation {
    condition     = var.account_id == null || can(regex("^[0-9]{12}$", var.account_id))
    error_message = "account_id: 12 digits."
  }
}

variable "vpc_id" {
  description = "The VPC the cluster's nodes run in (the default VPC unless cluster.yaml names SubnetIds): the security group is created there."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id: a VPC id, vpc-..."
  }
}

variable "ssh_ingress_cidrs" {
  description = "Who may reach the nodes' SSH port (the launcher, and the tunnel to the dashboard): your address, e.g. [\"203.0.113.7/32\"]. No other port is open from outside the cluster."
  type        = list(string)

  validation {
    condition     = length(var.ssh_ingress_cidrs) > 0 && alltrue([for cidr in var.ssh_ingress_cidrs : can(cidrhost(cidr, 0)) && !contains(["0.0.0.0/0", "::/0"], cidr)])
    error_message = "ssh_ingress_cidrs: one or more CIDR blocks, never the whole internet (0.0.0.0/0, ::/0)."
  }
}

variable "worker_instance_types" {
  description = "The only instance types the head may launch as workers (a cost guard): cluster.yaml's worker InstanceType must be one of them."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]
}

variable "kms_key_arn" {
  description = "A KMS key for SSE-KMS on every bucket (the roles get encrypt/decrypt on it); null: SSE-S3."
  type        = string
  default     = null
}

variable "ray_checkpoint_expiration_days" {
  description = "Objects in the ray bucket (Train/Tune checkpoints and experiment state) expire after this many days; 0: never."
  type        = number
  default     = 30
}

variable "noncurrent_version_expiration_days" {
  description = "Overwritten or deleted object versions are kept this many days in every bucket."
  type        = number
  default     = 30
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete buckets that still hold objects."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}
