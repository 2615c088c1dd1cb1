# Credentials come from your AWS CLI profile or environment (AWS_PROFILE, SSO, ...): nothing secret lives here.
provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ project = "resnet-pipeline", managed-by = "terraform", ray-cluster = var.cluster_name }, var.tags)
  }
}
