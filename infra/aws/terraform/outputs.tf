output "bucket_names" {
  description = "Bucket names by role (data, dvc, mlflow, ray)."
  value       = module.buckets.names
}

output "bucket_arns" {
  description = "Bucket ARNs by role."
  value       = module.buckets.arns
}

output "bucket_uris" {
  description = "s3:// URIs by role: the DVC remote, MLflow's artifact destination, ray.storage_path, --data."
  value       = module.buckets.uris
}

output "head_instance_profile_arn" {
  description = "Instance profile of the Ray head (cluster.yaml: head node_config.IamInstanceProfile)."
  value       = aws_iam_instance_profile.head.arn
}

output "worker_instance_profile_arn" {
  description = "Instance profile of the Ray GPU workers (cluster.yaml: worker node_config.IamInstanceProfile)."
  value       = aws_iam_instance_profile.worker.arn
}

output "head_instance_profile_name" {
  description = "Name of the head's instance profile (what cluster.yaml names)."
  value       = aws_iam_instance_profile.head.name
}

output "worker_instance_profile_name" {
  description = "Name of the workers' instance profile (what cluster.yaml names)."
  value       = aws_iam_instance_profile.worker.name
}

output "head_role_arn" {
  description = "IAM role of the Ray head."
  value       = aws_iam_role.head.arn
}

output "worker_role_arn" {
  description = "IAM role of the Ray workers."
  value       = aws_iam_role.worker.arn
}

output "security_group_name" {
  description = "The cluster's security group (cluster.yaml: provider.security_group.GroupName)."
  value       = aws_security_group.ray.name
}

output "security_group_id" {
  description = "The cluster's security group id."
  value       = aws_security_group.ray.id
}
