# Instance roles for the Ray nodes: no keys on the nodes, and each node may touch exactly what it needs.
#
#   head   (runs `ray job submit`ted drivers: dvc repro, the stages' drivers, Tune's driver, MLflow logging, and
#           the autoscaler): read-write on all four buckets; EC2 launch/stop/terminate of this cluster's workers
#           only; iam:PassRole of the worker role only.
#   worker (runs the DDP training workers and Tune trials): read on data, read-write on ray (checkpoints,
#           experiment state). No dvc or mlflow access: DVC runs in the driver and the Train controller, which
#           logs to MLflow, is attached to the driver's node.
#
# Left alone, the Ray launcher would create a head role with AmazonEC2FullAccess + AmazonS3FullAccess.

locals {
  head_name   = "${var.cluster_name}-ray-head"
  worker_name = "${var.cluster_name}-ray-worker"

  # Built from the names (not read back from the resources) so that the policies are exact at plan time.
  worker_role_arn             = "arn:${local.partition}:iam::${local.account_id}:role/${local.worker_name}"
  worker_instance_profile_arn = "arn:${local.partition}:iam::${local.account_id}:instance-profile/${local.worker_name}"

  ec2_arn = "arn:${local.partition}:ec2:${var.region}:${local.account_id}"
  vpc_arn = "${local.ec2_arn}:vpc/${var.vpc_id}"

  buckets = module.buckets.arns

  s3_object_read  = ["s3:GetObject"]
  s3_object_write = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
  s3_bucket_read  = ["s3:ListBucket", "s3:GetBucketLocation"]
  s3_bucket_write = ["s3:ListBucketMultipartUploads"]

  # What Ray's AWS node provider calls on the head (ray/autoscaler/_private/aws/node_provider.py).
  ec2_describe = [
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceStatus",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeImages",
    "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeKeyPairs",
  ]
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# ---- workers -------------------------------------------------------------------------------------------------

resource "aws_iam_role" "worker" {
  name                 = local.worker_name
  description          = "Ray GPU workers of ${var.cluster_name}: read the data bucket, read-write the ray bucket."
  assume_role_policy   = data.aws_iam_policy_document.ec2_assume.json
  max_session_duration = 3600
}

resource "aws_iam_instance_profile" "worker" {
  name = local.worker_name
  role = aws_iam_role.worker.name
}

data "aws_iam_policy_document" "worker" {
  statement {
    sid       = "ListPipelineBuckets"
    actions   = local.s3_bucket_read
    resources = [local.buckets["data"], local.buckets["ray"]]
  }

  statement {
    sid       = "ReadData"
    actions   = local.s3_object_read
    resources = ["${local.buckets["data"]}/*"]
  }

  statement {
    sid       = "ReadWriteRayStorage"
    actions   = concat(local.s3_object_read, local.s3_object_write)
    resources = ["${local.buckets["ray"]}/*"]
  }

  statement {
    sid       = "MultipartUploadsToRayStorage"
    actions   = local.s3_bucket_write
    resources = [local.buckets["ray"]]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "worker" {
  name   = "pipeline-buckets"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

# ---- head ----------------------------------------------------------------------------------------------------

resource "aws_iam_role" "head" {
  name                 = local.head_name
  description          = "Ray head of ${var.cluster_name}: the pipeline's buckets, and launching/terminating this cluster's workers."
  assume_role_policy   = data.aws_iam_policy_document.ec2_assume.json
  max_session_duration = 3600
}

resource "aws_iam_instance_profile" "head" {
  name = local.head_name
  role = aws_iam_role.head.name
}

data "aws_iam_policy_document" "head" {
  # Buckets listed one by one (not values(...)): checkov cannot evaluate a policy's checks through a function call.
  statement {
    sid       = "ListPipelineBuckets"
    actions   = concat(local.s3_bucket_read, local.s3_bucket_write)
    resources = [local.buckets["data"], local.buckets["dvc"], local.buckets["mlflow"], local.buckets["ray"]]
  }

  statement {
    sid     = "ReadWritePipelineObjects"
    actions = concat(local.s3_object_read, local.s3_object_write)
    resources = [
      "${local.buckets["data"]}/*",
      "${local.buckets["dvc"]}/*",
      "${local.buckets["mlflow"]}/*",
      "${local.buckets["ray"]}/*",
    ]
  }

  # Describe calls cannot be scoped to resources (AWS offers no resource-level permissions for them).
  statement {
    sid       = "AutoscalerDescribe"
    actions   = local.ec2_describe
    resources = ["*"]
  }

  # Launch: only instances tagged as this cluster's, with the worker profile, of an allowed type.
  statement {
    sid       = "LaunchWorkersOfThisCluster"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
    condition {
      test     = "ArnEquals"
      variable = "ec2:InstanceProfile"
      values   = [local.worker_instance_profile_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "ec2:InstanceType"
      values   = var.worker_instance_types
    }
  }

  # ...in this VPC (subnets, security groups, network interfaces)...
  statement {
    sid     = "LaunchIntoThisVpc"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/*",
      "${local.ec2_arn}:network-interface/*",
    ]
    condition {
      test     = "ArnEquals"
      variable = "ec2:Vpc"
      values   = [local.vpc_arn]
    }
  }

  # ...with the other resources a launch names or creates.
  statement {
    sid     = "LaunchSupportingResources"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:key-pair/*",
      "${local.ec2_arn}:spot-instances-request/*",
      "arn:${local.partition}:ec2:${var.region}::image/*",
    ]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  # Re-tag (node status), stop, start and terminate: only instances already tagged as this cluster's.
  statement {
    sid       = "ManageWorkersOfThisCluster"
    actions   = ["ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "PassOnlyTheWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [local.worker_role_arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "head" {
  name   = "pipeline-buckets-and-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.head.json
}
